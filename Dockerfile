# syntax=docker/dockerfile:1
# Two images from one file, built by `make images REGISTRY=...` (scripts/images.sh) or by hand:
#   docker build --target operator -t $REGISTRY/codistill/operator:0.1.0 .
#   docker build --target trainer  -t $REGISTRY/codistill/trainer:0.1.0 .
# The trainer installs CPU torch by default; for CUDA pick the wheel index of your CUDA version
# (the wheels bring their own CUDA runtime, the node only needs the NVIDIA driver):
#   docker build --target trainer --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# and, if you want a CUDA base image, one that has Python 3.11 with venv:
#   --build-arg TRAINER_BASE=<your CUDA image with python3.11>
# Every package version comes from requirements/all.lock (used as pip constraints, so each image
# installs only its own extra, pinned).

# A tag, which can be moved: release builds pin the digest instead (docs/cluster.md, "Pinning
# digests"): make images ... PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG TRAINER_BASE=${PYTHON_IMAGE}

# The project's source, and nothing else (see .dockerignore).
FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/ requirements/
COPY operator/ operator/
COPY trainer/ trainer/

# The operator's virtualenv: kopf and the kubernetes client, no torch.
FROM ${PYTHON_IMAGE} AS operator-venv
COPY --from=source /src /src
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c /src/requirements/all.lock "/src[operator]" \
 && /opt/venv/bin/pip check

FROM ${PYTHON_IMAGE} AS operator
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=operator-venv /opt/venv /opt/venv
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin codistill
# Numeric, so that Kubernetes can check runAsNonRoot without a passwd lookup.
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "codistill_operator"]
CMD ["--all-namespaces", "--liveness-port", "8080", "--metrics-port", "9090"]

# The trainer: torch, the built-in tasks and their data, baked in (never downloaded at run time).
# Build FROM this image to add your own task package (see docs/cluster.md).
FROM ${TRAINER_BASE} AS trainer
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CODISTILL_DATA=/opt/codistill/data \
    MPLCONFIGDIR=/tmp/matplotlib
COPY --from=source /src /src
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c /src/requirements/all.lock \
        --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple "/src[trainer]" \
 && /opt/venv/bin/pip check \
 && rm -rf /src
RUN codistill data fetch && chmod -R a+rX /opt/codistill
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin codistill
WORKDIR /home/codistill
USER 10001:10001
CMD ["python", "-m", "codistill_trainer.worker"]
