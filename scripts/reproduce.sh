#!/usr/bin/env bash
# Set everything up and run the main job: `avlens reproduce` on the bundled organism (report in avlens-reproduce/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/avlens reproduce --out "${1:-avlens-reproduce}"
