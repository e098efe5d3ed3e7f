# syntax=docker/dockerfile:1
#
# weir: an OpenAI-compatible LLM server, on an NVIDIA GPU (or on CPU with WEIR_DEVICE=cpu).
#
# Build:
#   docker build -t weir .
#   docker build -t weir:my-model --build-arg MODEL_DIR=models/my-model .   # bake a checkpoint in
# MODEL_DIR is a Hugging Face checkpoint folder inside the build context; by default the image
# carries weir's small embedded demo model. Either way the image's model is /models/default.
#
# Run:
#   docker run --gpus all -p 8000:8000 weir                       # the image's model
#   docker run --gpus all -p 8000:8000 -v /srv/llama:/models/llama:ro weir /models/llama
# Arguments after the image name are `weir serve` arguments (MODEL_DIR and flags); every flag is
# also an environment variable WEIR_<OPTION> (WEIR_MODEL, WEIR_PORT, WEIR_SHUTDOWN_TIMEOUT, ...).
# SIGTERM drains in-flight requests for up to --shutdown-timeout (30 s): stop with a longer grace
# period, e.g. `docker stop -t 45` or `docker run --stop-timeout 45`.

ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

# ---- build: weir's wheel (pure Python; the embedded default model is package data) ----
FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY engine ./engine
COPY ops ./ops
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime ----
FROM ${BASE_IMAGE}

# Triton compiles a small C launcher for each kernel at run time: it needs a C compiler, which
# CUDA runtime images lack. Versions come from the base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch (and triton) come with the base image; pip adds weir and its other dependencies.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir /wheels/*.whl

# A numeric USER lets Kubernetes verify runAsNonRoot.
RUN useradd --no-log-init --create-home --uid 10001 --user-group weir

# Owned by the server's user so it can read the weights whatever their mode (save_pretrained
# writes model.safetensors as 0600).
ARG MODEL_DIR=engine/default_model
COPY --chown=10001:10001 ${MODEL_DIR} /models/default

USER 10001:10001
WORKDIR /home/weir

ENV WEIR_HOST=0.0.0.0 \
    WEIR_PORT=8000 \
    WEIR_MODEL=/models/default \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TRITON_CACHE_DIR=/home/weir/.cache/triton

# Triton compiles weir's kernels on their first launch and keeps them in TRITON_CACHE_DIR: mount a
# volume there so later starts skip the compiles (README, Docker and Kubernetes).

EXPOSE 8000

# /health answers 200 once the model is loaded and warmed up, 503 while starting, draining or broken.
# Set the port with WEIR_PORT (not --port) so this check follows it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('WEIR_PORT', '8000') + '/health', timeout=4)"]

ENTRYPOINT ["weir", "serve"]
CMD []
