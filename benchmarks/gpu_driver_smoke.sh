#!/usr/bin/env bash
# The whole driver on one CUDA GPU (NCCL, bf16): SparseGPT prior, 12 mask-learning iterations with a
# checkpoint at 6 and validation, exact resume to 14, export to a Hugging Face folder, 2:4 verification.
# Uses the tiny pretrained LLaMA-shaped run that the tests build (no model hub on GPU machines):
#   python tests/scripts/make_tiny_run.py TINY        # here, on CPU (1.6 MB)
#   bash benchmarks/gpu_driver_smoke.sh TINY OUTDIR    # on the GPU machine (about a minute)
# Also runs on CPU (gloo, fp32), more slowly.
set -euo pipefail
cd "$(dirname "$0")/.."
TINY=$(realpath "$1")
OUTDIR=$(realpath -m "$2")
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR"
config() {  # config ITERS -> $OUTDIR/run.yaml
  cat > "$OUTDIR/run.yaml" <<EOF
model: {checkpoint: $TINY/ckpt}
parallel: {tp: 1}
data: {train: [$TINY/data/botchan_text_document], split: "90,10,0", seq_length: 64, micro_batch_size: 4,
       global_batch_size: 8, cache_dir: $OUTDIR/cache}
optim: {lr: 0.002, min_lr: 0.0002}
prior: {method: sparsegpt, calib_samples: 16}
run: {out_dir: $OUTDIR/run, train_iters: $1, log_interval: 2, eval_interval: 6, eval_iters: 4, save_interval: 6}
EOF
}
train() { "$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29571 \
            -m maskllm_megatron.train --config "$OUTDIR/run.yaml"; }
config 12 && train
config 14 && train
"$PY" -m maskllm_megatron.export.cli --ckpt "$OUTDIR/run/checkpoints" --out "$OUTDIR/hf" --format hf
"$PY" -m maskllm_megatron.eval.verify "$OUTDIR/hf"
echo "gpu_driver_smoke: OK"
