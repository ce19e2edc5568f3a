"""The README stays true to the code: its commands, its settings table, its contracts."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_first_two_commands_are_the_demo_and_the_ci_test_command() -> None:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).strip().splitlines()]
    assert commands == ["bash infra/scripts/demo.sh", "bash infra/scripts/test.sh"]
    assert "bash infra/scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_configuration_table_matches_settings() -> None:
    from workers.config_doc import settings_markdown

    table = README.split("<!-- config-table -->\n", 1)[1].split("\n<!-- /config-table -->", 1)[0]
    assert table.strip() == settings_markdown().strip(), "regenerate with `enrich config --markdown`"


def test_every_error_code_is_documented() -> None:
    from tasks.errors import ErrorCode

    missing = [c.value for c in ErrorCode if f"`{c.value}`" not in README]
    assert not missing, f"error codes missing from the README: {missing}"


def test_every_contract_file_is_named() -> None:
    for path in (ROOT / "tasks" / "contracts").glob("*.schema.json"):
        assert path.name in README, path.name
