#!/usr/bin/env bash
# Fresh machine -> tests: a virtual environment, drlora with its dev extra, then pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/core -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DRLORA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# A CPU build of torch where one is at hand (plain `torch` may pull a multi-GB CUDA build).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
python -m pip install -q -e ".[dev]"
exec python -m pytest -q -p no:cacheprovider "$@"
