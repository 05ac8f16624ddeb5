#!/usr/bin/env bash
# Run on every node (same command): MASTER_ADDR=node0 NNODES=8 bash examples/launch_multi_node.sh examples/llama2_7b.yaml
# With TP=8 per node and 8 nodes the run is DP=8: the distributed optimizer shards the logits'
# Adam state eight ways. A rank that dies restarts the group on every node (up to MAX_RESTARTS times),
# which resumes from the newest checkpoint.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG.yaml [overrides]}; shift
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec torchrun --nnodes "${NNODES:?set NNODES}" --nproc-per-node "${GPUS_PER_NODE:-8}" --max-restarts "${MAX_RESTARTS:-3}" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
    --rdzv-id "${RDZV_ID:-maskllm}" -m maskllm_megatron.train --config "$CONFIG" "$@"
