#!/usr/bin/env bash
# GPU smoke benchmark (one CUDA GPU, bf16; about 3-5 minutes on an H100/H200, hard limit 7.5 minutes):
# masked layer vs dense, SmolLM2-shaped mask-learning step vs dense step, exported 2:4 weights through
# torch.sparse.to_sparse_semi_structured vs dense matmul. Results: JSON on stdout and $OUT/gpu_smoke.json
# (or ./gpu_smoke.json). Needs torch with CUDA and megatron-core 0.16.1 (pip install -e . in the repo).
#   usage: bash benchmarks/gpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-.}
mkdir -p "$DEST"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_smoke.sh: no CUDA device visible to torch')"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
rm -f "$DEST/layer_profile.txt"
timeout 450 "$PY" benchmarks/gpu_smoke.py --json "$DEST/gpu_smoke.json" --profile "$DEST/layer_profile.txt"
