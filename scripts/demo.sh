#!/usr/bin/env bash
# Fresh machine -> the main job on the bundled tiny model: a virtual environment, drlora,
# then train two DR-LoRA adapters, serve them, query them, hot-load a third (scripts/demo.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup_env.sh
exec python scripts/demo.py "$@"
