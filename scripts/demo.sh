#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and run the end-to-end replication demo:
# a local KVM guest protected into a local replica on the embedded defaults
# (Temporal dev server, SQLite). Extra arguments go to scripts/demo.py (--keep, --cycles N).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
