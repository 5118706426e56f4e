#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and run the test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh --long` for the soak runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
