#!/usr/bin/env bash
# Set everything up and run the test suite (installs Debian's chromium for the report's screenshot test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if ! command -v chromium >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium
fi
.venv/bin/ruff check avlens tests benchmarks
.venv/bin/lint-imports  # the one-way layers of pyproject.toml [tool.importlinter]
exec .venv/bin/python -m pytest "$@"
