#!/usr/bin/env bash
# Fresh machine -> the main job on the bundled tiny model: a virtual environment, drlora,
# then train two DR-LoRA adapters, serve them, query them, hot-load a third (scripts/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DRLORA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
python -m pip install -q -e ".[dev]"
exec python scripts/demo.py "$@"
