#!/usr/bin/env bash
# The whole driver on one CUDA GPU (NCCL, bf16): SparseGPT prior, 14 mask-learning iterations with
# checkpoints at 6 and 12 and validation; the run resumed from its checkpoint at 6 (a copy) gives the
# same losses; export to a Hugging Face folder, 2:4 verification.
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
config() {  # config OUT_DIR -> $OUTDIR/run.yaml
  cat > "$OUTDIR/run.yaml" <<EOF
model: {checkpoint: $TINY/ckpt}
parallel: {tp: 1}
data: {train: [$TINY/data/botchan_text_document], split: "90,10,0", seq_length: 64, micro_batch_size: 4,
       global_batch_size: 8, cache_dir: $OUTDIR/cache}
optim: {lr: 0.002, min_lr: 0.0002}
prior: {method: sparsegpt, calib_samples: 16}
run: {out_dir: $1, train_iters: 14, log_interval: 2, eval_interval: 6, eval_iters: 4, save_interval: 6}
EOF
}
train() { "$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29571 \
            -m maskllm_megatron.train --config "$OUTDIR/run.yaml"; }
config "$OUTDIR/run" && train
cp -r "$OUTDIR/run" "$OUTDIR/resumed"
echo iter_0000006 > "$OUTDIR/resumed/checkpoints/latest"
rm -rf "$OUTDIR/resumed/checkpoints/iter_0000012" "$OUTDIR/resumed/checkpoints/iter_0000014"
config "$OUTDIR/resumed" && train
"$PY" - "$OUTDIR" <<'EOF'
import sys, torch
def losses(run):
    return [h[1] for h in torch.load(f"{sys.argv[1]}/{run}/checkpoints/iter_0000014/extra_state.pt",
                                     weights_only=False)["history"]]
a, b = losses("run"), losses("resumed")
worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(f"resume from 6: {len(b)} iterations, worst relative loss difference {worst:.2e}")
assert len(a) == len(b) == 14 and a[:6] == b[:6] and worst < 1e-3, (a, b)
EOF
"$PY" -m maskllm_megatron.export.cli --ckpt "$OUTDIR/run/checkpoints" --out "$OUTDIR/hf" --format hf
"$PY" -m maskllm_megatron.export.verify "$OUTDIR/hf"
echo "gpu_driver_smoke: OK"
