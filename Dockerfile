# drlora-serve on a CUDA machine.
#   docker build -t drlora-serve .
#   docker run --gpus all -p 8000:8000 -v $HOME/.cache/huggingface:/data/hf \
#       -v $PWD/adapters:/adapters drlora-serve --model olmoe --adapters /adapters
# The base image brings CUDA 12 and torch (with triton); pip keeps them and adds the rest.
ARG BASE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf \
    DRLORA_HOME=/data/drlora

WORKDIR /app
# Sources only (.dockerignore keeps out the venv, caches, runs and adapters).
COPY . /app
RUN pip install /app && python -c "import server.cli, drlora_serve.config"

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
