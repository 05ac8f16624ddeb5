#!/usr/bin/env bash
# One node, 8 GPUs: bash examples/launch_single_node.sh examples/llama2_7b.yaml [key=value ...]
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [overrides]}; shift
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec torchrun --nproc-per-node "${GPUS_PER_NODE:-8}" -m maskllm_megatron.train --config "$CONFIG" "$@"
