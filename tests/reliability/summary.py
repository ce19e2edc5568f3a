"""The reliability suite's session table: one row per scenario, printed at the end of the session
(tests/reliability/conftest.py ``pytest_terminal_summary``).

Both halves of the suite record into it: the fault-injection scenarios (lost / duplicated) and the
hostile-input ones (connections to refused addresses). ``None`` means "not measured by this
scenario" and prints as ``-``; the totals row sums what was measured.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class ScenarioRow:
    scenario: str
    published: int = 0
    done: int = 0
    failed_by_code: Counter[str] = field(default_factory=Counter)
    rejected: int = 0
    lost: int = 0
    duplicated: int = 0
    refused_connections: int | None = None
    note: str = ""


_rows: list[ScenarioRow] = []

MUST_BE_ZERO = ("lost", "duplicated", "refused_connections")


def record(scenario: str, *, published: int = 0, done: int = 0, failed_by_code: Mapping[str, int] | None = None,
           rejected: int = 0, lost: int = 0, duplicated: int = 0, refused_connections: int | None = None,
           note: str = "") -> ScenarioRow:
    """Add one scenario's figures to the session table (call it before asserting, so a failing
    scenario still shows what it saw)."""
    row = ScenarioRow(scenario=scenario, published=published, done=done, failed_by_code=Counter(failed_by_code or {}),
                      rejected=rejected, lost=lost, duplicated=duplicated, refused_connections=refused_connections,
                      note=note)
    _rows.append(row)
    return row


def rows() -> list[ScenarioRow]:
    return list(_rows)


def clear() -> None:
    _rows.clear()


def render(table: list[ScenarioRow] | None = None) -> str:
    table = _rows if table is None else table
    if not table:
        return ""
    header = ["scenario", "published", "done", "failed by code", "rejected", "lost", "duplicated", "refused conns"]

    def fmt_codes(c: Counter[str]) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(c.items())) or "-"

    body = [[r.scenario, str(r.published), str(r.done), fmt_codes(r.failed_by_code), str(r.rejected), str(r.lost),
             str(r.duplicated), "-" if r.refused_connections is None else str(r.refused_connections)] for r in table]
    total_codes: Counter[str] = Counter()
    for r in table:
        total_codes.update(r.failed_by_code)
    refused = [r.refused_connections for r in table if r.refused_connections is not None]
    body.append([f"TOTAL ({len(table)} scenarios)", str(sum(r.published for r in table)), str(sum(r.done for r in table)),
                 fmt_codes(total_codes), str(sum(r.rejected for r in table)), str(sum(r.lost for r in table)),
                 str(sum(r.duplicated for r in table)), str(sum(refused)) if refused else "-"])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out += [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body[:-1]]
    out += [line, " | ".join(c.ljust(w) for c, w in zip(body[-1], widths, strict=True))]
    return "\n".join(out)


def violations(table: list[ScenarioRow] | None = None) -> list[str]:
    """Scenarios whose must-be-zero columns are not zero."""
    table = _rows if table is None else table
    return [f"{r.scenario}: {name}={getattr(r, name)}" for r in table for name in MUST_BE_ZERO
            if getattr(r, name) not in (0, None)]
