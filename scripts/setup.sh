#!/usr/bin/env bash
# Set up nmfx in the current Python: keep an installed torch, else install the CPU 2.13.0
# build, then install nmfx (editable) with the given extras. Usage: setup.sh [extras]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python -m pip --version >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
    echo "setup: no torch found; installing torch==2.13.0 (CPU build)"
    python -m pip install --quiet torch==2.13.0
fi
python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
python -c "import torch, nmfx; print(f'setup: nmfx {nmfx.__version__}, torch {torch.__version__}')"
