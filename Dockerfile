# syntax=docker/dockerfile:1
# rnnstream server image.
#   CPU:  docker build -t rnnstream:cpu .
#   CUDA: docker build --build-arg DEVICE=cuda -t rnnstream:cuda .
# Run with the shipped models, or mount your own model repository on /models:
#   docker run --rm -p 50051:50051 -p 9400:9400 rnnstream:cpu
#   docker run --rm -p 50051:50051 -v $PWD/my-models:/models \
#     -e RNNSTREAM_MODEL_REPOSITORY=/models rnnstream:cpu
#   docker run --rm --gpus all -p 50051:50051 rnnstream:cuda
# See docs/deploy.md.
#
# Both variants start from python:3.11-slim and install the project with one server extra:
# `cpu` (onnxruntime) or `cuda` (onnxruntime-gpu with its own `cuda` and `cudnn` extras: the
# NVIDIA CUDA runtime and cuDNN wheels of exactly the CUDA version that onnxruntime-gpu release
# was built for, so the image never pairs it with the wrong CUDA base). The host needs only the
# NVIDIA driver and the NVIDIA container toolkit. Both add the `redis` extra (--state-store).

# cpu | cuda: which onnxruntime build (and CUDA libraries) the image gets.
ARG DEVICE=cpu

# ---- builder: install the project from its pyproject into a virtualenv.
FROM python:3.11-slim AS builder
ARG DEVICE
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/rnnstream/venv
ENV PATH=/opt/rnnstream/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
# The extras `cpu` and `cuda` are alternatives: each brings exactly one ONNX Runtime package.
RUN set -eu; \
    case "$DEVICE" in \
      cpu|cuda) pip install ".[$DEVICE,redis]" ;; \
      *) echo "DEVICE must be cpu or cuda, not '$DEVICE'" >&2; exit 1 ;; \
    esac; \
    pip check; \
    python3 -c "import onnxruntime, rnnstream.server; \
providers = onnxruntime.get_available_providers(); print(providers); \
assert '$DEVICE' == 'cpu' or 'CUDAExecutionProvider' in providers, providers"

# ---- runtime: the virtualenv, the shipped models and an unprivileged user.
FROM python:3.11-slim AS runtime
ARG DEVICE
LABEL org.opencontainers.image.title="rnnstream" \
      org.opencontainers.image.description="gRPC inference microservice for stateful recurrent ONNX models" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/rnnstream/venv /opt/rnnstream/venv
# CUDA image: make the NVIDIA libraries from the wheels visible to the dynamic loader.
RUN set -eu; \
    groupadd --system --gid 10001 rnnstream; \
    useradd --system --uid 10001 --gid rnnstream --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin rnnstream; \
    mkdir -p /models; chown rnnstream:rnnstream /models; \
    nvidia=$(/opt/rnnstream/venv/bin/python -c \
      "import sysconfig; print(sysconfig.get_path('purelib'))")/nvidia; \
    if [ -d "$nvidia" ]; then \
      find "$nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u > /etc/ld.so.conf.d/rnnstream-cuda.conf; \
      ldconfig; \
    fi
COPY models/ /opt/rnnstream/models/
# RNNSTREAM_METRICS_PORT: the Prometheus endpoint's port (published below as 9400).
# RNNSTREAM_DEVICE: cpu in the CPU image; cuda in the CUDA image, so a missing GPU fails loudly
# instead of quietly running on the CPU (-e RNNSTREAM_DEVICE=auto allows the fallback).
ENV PATH=/opt/rnnstream/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RNNSTREAM_HOST=0.0.0.0 \
    RNNSTREAM_PORT=50051 \
    RNNSTREAM_METRICS_PORT=9400 \
    RNNSTREAM_MODEL_REPOSITORY=/opt/rnnstream/models \
    RNNSTREAM_DEVICE=${DEVICE}
# Your own model repository: -v $PWD/my-models:/models -e RNNSTREAM_MODEL_REPOSITORY=/models
VOLUME /models
WORKDIR /opt/rnnstream
USER 10001:10001
EXPOSE 50051 9400
# Exit 1 unless the server answers SERVING; it turns NOT_SERVING first thing on SIGTERM. With
# TLS on (RNNSTREAM_TLS_CERT/RNNSTREAM_TLS_KEY, and RNNSTREAM_TLS_CLIENT_CA for mutual TLS) the
# check speaks the server's TLS from those same variables (`rnnstream health --help`).
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 \
  CMD rnnstream health --target "127.0.0.1:${RNNSTREAM_PORT}" --timeout 5 || exit 1
# Exec form: the server is PID 1 and gets SIGTERM itself, so `docker stop` drains sessions
# (that takes up to 10 s: give it --stop-timeout 15 or more). Arguments after the image name
# become server flags, e.g. `docker run rnnstream:cpu --models gru,lstm`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rnnstream-server"]
CMD []
