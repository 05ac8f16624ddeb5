#!/usr/bin/env bash
# A mixture-of-experts model on one CUDA GPU (NCCL, bf16): the tiny Qwen2-MoE (tests/scripts/make_tiny_moe.py)
# converted on the GPU, a Wanda prior (per expert, on its routed tokens), 4 mask-learning iterations with
# checkpoints at 2 and 4; the run resumed from its checkpoint at 2 (a copy) gives the same losses; export to a
# Hugging Face folder, 2:4 verification, transformers' logits (fp32, CPU) vs the masked model's (bf16, GPU).
#   python tests/scripts/make_tiny_moe.py TINY     # here, on CPU (about 1 MB)
#   bash benchmarks/gpu_moe_smoke.sh TINY OUTDIR   # on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
TINY=$(realpath "$1")
OUTDIR=$(realpath -m "$2")
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR"
"$PY" -m maskllm_megatron.convert.cli hf-to-mcore --hf "$TINY/hf" --out "$OUTDIR/ckpt"
config() {  # config OUT_DIR -> $OUTDIR/run.yaml
  cat > "$OUTDIR/run.yaml" <<YAML
model: {checkpoint: $OUTDIR/ckpt}
parallel: {tp: 1, ep: 1}
data: {train: [$TINY/botchan_text_document], split: "90,10,0", seq_length: 32, micro_batch_size: 4,
       global_batch_size: 8, cache_dir: $OUTDIR/cache}
optim: {lr: 0.0002, min_lr: 0.00002}
prior: {method: wanda, calib_samples: 4}
run: {out_dir: $1, train_iters: 4, log_interval: 1, eval_interval: 4, eval_iters: 1, save_interval: 2, tensorboard: false}
YAML
}
train() { "$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29572 \
            -m maskllm_megatron.train --config "$OUTDIR/run.yaml"; }
config "$OUTDIR/run" && train
cp -r "$OUTDIR/run" "$OUTDIR/resumed"
echo iter_0000002 > "$OUTDIR/resumed/checkpoints/latest"
rm -rf "$OUTDIR/resumed/checkpoints/iter_0000004"
config "$OUTDIR/resumed" && train
"$PY" - "$OUTDIR" <<'PYEOF'
import sys
from maskllm_megatron.checkpoint_files import read_extra
def losses(run):
    return [h[1] for h in read_extra(f"{sys.argv[1]}/{run}/checkpoints/iter_0000004")["history"]]
a, b = losses("run"), losses("resumed")
worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(f"resume from 2: {len(b)} iterations, losses {a}, worst relative loss difference {worst:.2e}")
assert len(a) == len(b) == 4 and a[:2] == b[:2] and worst < 1e-3, (a, b)
PYEOF
"$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29573 \
    tests/scripts/moe_worker.py export "$OUTDIR/run/checkpoints/iter_0000004" "$OUTDIR/hf"
"$PY" -m maskllm_megatron.export.verify "$OUTDIR/hf"
echo "gpu_moe_smoke: OK"
