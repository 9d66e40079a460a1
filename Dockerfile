# GPU image for opd-ray: vLLM's official CUDA image (torch + vllm) plus the learner stack.
#   docker build -t opd-ray .
#   docker run --gpus all --shm-size 16g opd-ray opd-ray train examples/quickstart.yaml
FROM vllm/vllm-openai:v0.11.0

ENV PYTHONUNBUFFERED=1 \
    TORCHDYNAMO_DISABLE=0

WORKDIR /opt/opd-ray
COPY pyproject.toml README.md ./
COPY opd_ray ./opd_ray
COPY examples ./examples

# vllm and torch come from the base image; `--no-deps` on our package keeps pip from
# swapping them, and the rest of the runtime dependencies are installed explicitly.
RUN pip install --no-cache-dir "ray[default]==2.60.0" "deepspeed>=0.17" "accelerate>=1.0" \
        "pydantic>=2.10" "omegaconf>=2.3" "datasets>=3.0" "tensorboard>=2.18" "rich>=13" \
    && pip install --no-cache-dir --no-deps -e .

ENTRYPOINT []
CMD ["opd-ray", "--help"]
