#!/usr/bin/env bash
# The README's test command: set up (dev + hf extras), lint, run the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,hf
ruff check .
python -m pytest -q -m "not slow" "$@"
