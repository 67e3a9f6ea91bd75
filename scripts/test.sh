#!/usr/bin/env bash
# Fresh machine -> tests: a virtual environment, drlora with its dev extra, then pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/core -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup_env.sh
exec python -m pytest -q -p no:cacheprovider "$@"
