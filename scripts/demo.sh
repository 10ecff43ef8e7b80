#!/usr/bin/env bash
# The README's main job: set up, then run the nmfx demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
nmfx demo "$@"
