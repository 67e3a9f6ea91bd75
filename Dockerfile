# drlora-serve on a CUDA machine.
#   docker build -t drlora-serve .
#   docker run --gpus all -p 8000:8000 -v $HOME/.cache/huggingface:/data/hf \
#       -v $PWD/adapters:/adapters drlora-serve --model olmoe --adapters /adapters
# torch's PyPI wheels for Linux x86_64 bundle the CUDA runtime libraries, and the NVIDIA
# container runtime brings the driver, so a plain Python image is enough. Triton compiles a
# small C launcher at run time: it needs gcc and the libc headers (Python.h is in the image).
ARG PYTHON=3.12
FROM python:${PYTHON}-slim
ARG TORCH=2.11.0

RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf \
    DRLORA_HOME=/data/drlora

WORKDIR /app
# Sources only (.dockerignore keeps out the venv, caches, runs and adapters).
COPY . /app
RUN pip install "torch==${TORCH}" && pip install /app \
    && python -c "import server.cli, drlora_serve.config, triton"

RUN useradd --create-home --uid 1000 drlora \
    && mkdir -p /data/hf /data/drlora /adapters \
    && chown -R drlora /data /adapters
USER drlora

EXPOSE 8000
VOLUME ["/data", "/adapters"]
# Model loading can take minutes on a cold cache: generous start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

# Listen on all interfaces inside the container (the CLI's own default is 127.0.0.1);
# flags given to `docker run` are appended and win over these (argparse: last one counts).
ENTRYPOINT ["drlora-serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "olmoe", "--adapters", "/adapters"]
