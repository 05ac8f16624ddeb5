"""How far Adam's eps damps the mask logits' updates: quantiles of sqrt(bias-corrected exp_avg_sq) of one
projection's logits in a training checkpoint, and the share below eps (not in CI).

    python benchmarks/adam_moments.py RUN/checkpoints/iter_0000240 [--beta2 0.95] [--eps 1e-5]
        [--projection linear_fc2]

Adam's step for a logit is lr * m / (sqrt(v) + eps): where sqrt(v) is below eps, the logit moves at a
fraction sqrt(v) / eps of the learning rate. Reads the optimizer state of a torch_dist checkpoint with
torch.distributed.checkpoint (no process group); quantiles over a strided sample (1 in 7, at most 16M).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from maskllm_megatron.run_folder import checkpoint_iteration


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--beta2", type=float, default=0.95, help="the run's optim.adam_beta2 (bias correction)")
    p.add_argument("--eps", type=float, default=1e-5, help="the run's optim.adam_eps")
    p.add_argument("--projection", default="linear_fc2",
                   choices=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    args = p.parse_args(argv)
    iteration = checkpoint_iteration(args.checkpoint.name)
    if not iteration:
        raise SystemExit(f"error: {args.checkpoint} is not a training checkpoint after step 1 (iter_NNNNNNN): "
                         "pass RUN/checkpoints/iter_<n> with n >= 1")
    meta = dcp.FileSystemReader(str(args.checkpoint)).read_metadata().state_dict_metadata
    suffix = f".{args.projection}.mask_logits"
    keys = [k for k in meta if k.startswith("optimizer.state.exp_avg_sq.") and k.endswith(suffix)]
    if len(keys) != 1:
        raise SystemExit(f"error: {args.checkpoint} holds {len(keys)} Adam second moments of {args.projection} mask "
                         "logits, not 1: pass a mask-learning checkpoint saved with its optimizer state")
    key, = keys
    state = {key: torch.empty(meta[key].size)}
    dcp.load(state, checkpoint_id=str(args.checkpoint), no_dist=True)
    rms = (state[key].flatten()[::7][:16_000_000] / (1 - args.beta2 ** iteration)).sqrt().double()
    q = torch.quantile(rms, torch.tensor([0.1, 0.5, 0.9], dtype=torch.double)).tolist()
    print(f"iteration {iteration} {args.projection}: sqrt(v_hat) p10 {q[0]:.2e} p50 {q[1]:.2e} p90 {q[2]:.2e}; "
          f"share below eps {args.eps:g}: {(rms < args.eps).double().mean():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
