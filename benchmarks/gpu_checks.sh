#!/usr/bin/env bash
# Every GPU check in one call, for a CUDA machine that has torch but not megatron-core (as the lent
# H200 machines): prepare here, run there.
#   bash benchmarks/gpu_checks.sh prepare    # here (needs pip): .whl/ (megatron-core for Python 3.12),
#                                            # .gpurun/tiny (the tests' tiny pretrained run, 1.6 MB) and
#                                            # .gpurun/moe (the tiny Qwen2-MoE and its dataset, 1.2 MB)
#   bash benchmarks/gpu_checks.sh run        # there: installs .whl/ into /tmp/site, then
#       1. the driver end to end on the GPU (gpu_driver_smoke.sh), compiled mask kernels;
#       2. the same with the one-pass Triton kernels (MASKLLM_TRITON_KERNEL=1);
#       3. gpu_smoke.sh: masked layer (compiled / one-pass / eager) vs dense, model step, 2:4 matmuls;
#       4. gpu_moe_smoke.sh: a mixture-of-experts model converted, learned, resumed, exported on the GPU;
#       5. gpu_nm_inference.py: compress() on CUDA (torch's semi-structured 2:4, bf16 and fp16) against the
#          dense linears: correctness, then decode (1, 8 tokens) and prefill (512) time of LLaMA-7B-shaped
#          layers, generate tokens/s of a SmolLM2-shaped model (needs transformers; else reported as an error).
# Logs and gpu_smoke.json go to $OUT (or ./gpu_checks_out). About 7-8 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
case "${1:-}" in
  prepare)
    set -e
    rm -rf .whl && "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
    rm -rf .gpurun && "$PY" tests/scripts/make_tiny_run.py .gpurun/tiny > /dev/null
    "$PY" tests/scripts/make_tiny_moe.py .gpurun/moe > /dev/null
    echo "prepared .whl/ ($(ls .whl)) and .gpurun/tiny; on the GPU machine: bash benchmarks/gpu_checks.sh run"
    ;;
  run)
    DEST=${OUT:-gpu_checks_out}
    mkdir -p "$DEST"
    if ! "$PY" -c "import megatron.core" 2> /dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_checks: cannot install .whl/ (run 'prepare' first)"; exit 2; }
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1 PYTHON="$PY"
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
        > "$DEST/versions.txt" 2>&1
    status=0
    timeout 150 bash benchmarks/gpu_driver_smoke.sh .gpurun/tiny /tmp/drv > "$DEST/driver.log" 2>&1 || status=1
    MASKLLM_TRITON_KERNEL=1 timeout 150 bash benchmarks/gpu_driver_smoke.sh .gpurun/tiny /tmp/drv1 \
        > "$DEST/driver_one_pass.log" 2>&1 || status=1
    cp /tmp/drv/run/metrics.jsonl "$DEST/driver_metrics.jsonl" 2> /dev/null
    cp /tmp/drv1/run/metrics.jsonl "$DEST/driver_one_pass_metrics.jsonl" 2> /dev/null
    OUT="$DEST" bash benchmarks/gpu_smoke.sh > "$DEST/gpu_smoke.log" 2>&1 || status=1
    timeout 150 bash benchmarks/gpu_moe_smoke.sh .gpurun/moe /tmp/moe > "$DEST/moe.log" 2>&1 || status=1
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 120 "$PY" benchmarks/gpu_nm_inference.py \
        --json "$DEST/nm_inference.json" > "$DEST/nm_inference.log" 2>&1 || status=1
    tail -n 3 "$DEST/driver.log" "$DEST/driver_one_pass.log" "$DEST/moe.log"
    grep -E '"(fused|one_pass|eager)_over_dense"|_vs_eager_' "$DEST/gpu_smoke.json" 2> /dev/null
    grep -E '"(error|correct|max_rel_error|speedup|tokens_identical)"' "$DEST/nm_inference.json" 2> /dev/null
    exit $status
    ;;
  *)
    echo "usage: bash benchmarks/gpu_checks.sh prepare|run"; exit 2
    ;;
esac
