# maskllm-megatron on GPU clusters. NVIDIA's NGC PyTorch image carries CUDA, NCCL, Transformer Engine
# and apex; we add megatron-core and this package without touching the image's torch.
#
#   docker build -t maskllm-megatron .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -v /data:/data -v /models:/models -v /ckpt:/ckpt -v /runs:/runs -it maskllm-megatron \
#       torchrun --nproc-per-node 8 -m maskllm_megatron.train --config examples/llama2_7b.yaml
#
# Multi-node: run the same container on every node with
#   torchrun --nnodes $NNODES --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $MASTER:29500 \
#       --rdzv-id maskllm -m maskllm_megatron.train --config examples/llama2_7b.yaml
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/maskllm-megatron
COPY setup.py README.md ./
COPY maskllm_megatron ./maskllm_megatron
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks

# The install steps of `make env` minus torch (the image's CUDA build stays) and minus the test-only
# extras: megatron-core pinned as in setup.py, then this package with the Hugging Face and metrics
# extras. The test suite is not in the image (it runs on CPU: `make test` in a checkout).
RUN pip install "megatron-core==0.16.1" \
 && pip install -e ".[hf,metrics]" \
 && python -c "import megatron.core, maskllm_megatron.megatron.layers; print('maskllm-megatron ready')"

CMD ["bash"]
