#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Re-runs are cheap: the install is
# skipped while pyproject.toml is unchanged since the last successful one.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "error: Python 3.11+ required (set PYTHON=/path/to/python3.11)" >&2; exit 2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing dependencies into .venv (first run downloads torch: several minutes)" >&2
  .venv/bin/pip install -q --upgrade pip wheel setuptools
  .venv/bin/pip install -q -e ".[test]"
  rm -f .venv/.installed-*; touch "$stamp"
fi
