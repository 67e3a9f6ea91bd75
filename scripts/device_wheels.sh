#!/usr/bin/env bash
# Wheels of the server's dependencies that the GPU device image lacks (its Python is 3.12),
# downloaded into .whl/ (git-ignored) so that a GPU session can carry them:
#   here:  bash scripts/device_wheels.sh
#   there: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#          && export PYTHONPATH=/tmp/site:$PWD
# llguidance is for structured outputs (imported on first use). The image already has torch, triton, transformers, numpy, httpx, anyio, h11, uvloop and
# prometheus-client. Versions are the ones this repository is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pkgs=(fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0
      annotated-doc==0.0.7 typing-inspection==0.4.5 uvicorn==0.54.0 httptools==0.9.0 pyzmq==27.3.0
      msgspec==0.22.0 llguidance==1.9.1)
for p in "${pkgs[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$p"
done
ls -1 .whl
