# GPU image for opd-ray: vLLM's official CUDA image (CUDA, torch, vllm) plus the learner stack.
#   docker build -t opd-ray .
#   docker run --gpus all --shm-size 16g -v /models:/models opd-ray \
#       opd-ray train examples/qwen3_1p7b_from_8b_1node.yaml
# On a cluster the same image runs every Ray node (cluster_configs/ use it as `opd-ray:latest`).
# The base's vllm matches the `gpu` extra (the version the CPU tests run), so pip keeps the
# base's vllm and torch and adds the rest of the package's dependencies, at the versions in
# cluster_configs/constraints-image.txt (the ones the test suite runs), not whatever is newest.
# Pin the base by digest for a reproducible build (the digest is not recorded here: this
# project's machines cannot reach a registry to read it):
#   docker build --build-arg BASE_IMAGE=vllm/vllm-openai@sha256:<digest> -t opd-ray .
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    TORCHDYNAMO_DISABLE=0 \
    RAY_DEDUP_LOGS=1 \
    RAY_AUTH_MODE=token \
    RAY_worker_niceness=0

WORKDIR /opt/opd-ray
COPY pyproject.toml README.md ./
COPY cluster_configs/constraints-image.txt ./constraints-image.txt
COPY opd_ray ./opd_ray
COPY examples ./examples
COPY cluster_configs ./cluster_configs

# the trackers' libraries too (logging.trackers: W&B, MLflow's client, trackio): a cluster job logs where its lab does
RUN pip install --no-cache-dir -c constraints-image.txt -e ".[gpu,trackers]" \
    && python -c "import opd_ray.cli, opd_ray.actors.collective_sync, vllm, deepspeed, ray, wandb, mlflow, trackio; print('opd-ray image ok')"

# Training runs as an unprivileged user who cannot rewrite the installed source (root owns it,
# read-only to everyone): a compromised job cannot change what later jobs run, nor write to the host's
# root-owned mounts. Mount run directories and caches where this user can write (e.g. /models/runs).
RUN useradd --create-home --uid 1000 opd && chown -R root:root /opt/opd-ray && chmod -R a-w /opt/opd-ray
USER opd

ENTRYPOINT []
CMD ["opd-ray", "--help"]
