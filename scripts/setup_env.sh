# Sourced by scripts/test.sh and scripts/demo.sh: a virtual environment in the checkout with
# drlora and its dev extra installed, activated.
VENV=${DRLORA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# A CPU build of torch where one is at hand (plain `torch` may pull a multi-GB CUDA build).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
python -m pip install -q -e ".[dev]"
