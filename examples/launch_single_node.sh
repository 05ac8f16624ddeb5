#!/usr/bin/env bash
# One node, 8 GPUs: bash examples/launch_single_node.sh examples/llama2_7b.yaml [key=value ...]
# A rank that dies restarts the group (up to MAX_RESTARTS times), which resumes from the newest checkpoint.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [overrides]}; shift
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec torchrun --nproc-per-node "${GPUS_PER_NODE:-8}" --max-restarts "${MAX_RESTARTS:-3}" -m maskllm_megatron.train --config "$CONFIG" "$@"
