#!/usr/bin/env bash
# Create .venv with avlens and its pinned dependencies (CPU torch). Used by the README's two commands.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
# extras (e.g. "test") only when asked: pip rejects an empty ".[]"
.venv/bin/python -m pip install -q -c constraints.txt -e ".${1:+[$1]}"
