# GPU image for opd-ray: vLLM's official CUDA image (CUDA, torch, vllm) plus the learner stack.
#   docker build -t opd-ray .
#   docker run --gpus all --shm-size 16g -v /models:/models opd-ray \
#       opd-ray train examples/qwen3_1p7b_from_8b_1node.yaml
# On a cluster the same image runs every Ray node (cluster_configs/ use it as `opd-ray:latest`).
# The base's vllm matches the `gpu` extra (the version the CPU tests run), so pip keeps the
# base's vllm and torch and adds the rest of the package's dependencies.
FROM vllm/vllm-openai:v0.32.0

ENV PYTHONUNBUFFERED=1 \
    TORCHDYNAMO_DISABLE=0 \
    RAY_DEDUP_LOGS=1

WORKDIR /opt/opd-ray
COPY pyproject.toml README.md ./
COPY opd_ray ./opd_ray
COPY examples ./examples
COPY cluster_configs ./cluster_configs

RUN pip install --no-cache-dir -e ".[gpu]" \
    && python -c "import opd_ray.driver, opd_ray.collective_sync, vllm, deepspeed, ray; print('opd-ray image ok')"

ENTRYPOINT []
CMD ["opd-ray", "--help"]
