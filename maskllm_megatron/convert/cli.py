"""``maskllm-convert``: Hugging Face <-> megatron-core checkpoints.

Launching: ``hf-to-mcore`` needs one process per TP x PP (x EP) rank. Launched plainly with ``--tp N``
(N > 1), it checks the input, then re-launches itself under ``torchrun --nproc-per-node tp*pp*ep``;
launched under torchrun already, it uses the given ranks. ``mcore-to-hf`` runs in one process
(loading the checkpoint at TP=1 whatever it was saved with), or under torchrun with nproc = TP size.
Errors in the input or the request print one line, ``error: <problem>: <fix>``, exit with status 2,
and leave no output behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  maskllm-convert hf-to-mcore --hf ~/.cache/maskllm_megatron/smollm2-135m-instruct --out ckpt/smollm2-tp1
  maskllm-convert hf-to-mcore --hf models/llama --out ckpt/llama-tp2 --tp 2 --dtype bf16
  maskllm-convert mcore-to-hf --ckpt ckpt/llama-tp2 --out models/llama-roundtrip
"""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="maskllm-convert", description="Hugging Face <-> megatron-core checkpoints.",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="Hugging Face folder -> megatron-core dist checkpoint",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--hf", required=True, type=Path, help="Hugging Face model folder (config.json + safetensors)")
    a.add_argument("--out", required=True, type=Path, help="checkpoint folder to create")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    a.add_argument("--ep", type=int, default=1, help="expert-parallel size of a mixture-of-experts model (default 1)")
    a.add_argument("--dtype", default="fp32", help="bf16, fp16 or fp32 (default fp32)")
    a.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    b = sub.add_parser("mcore-to-hf", help="megatron-core checkpoint -> Hugging Face folder",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--ckpt", required=True, type=Path, help="checkpoint folder written by hf-to-mcore")
    b.add_argument("--out", required=True, type=Path, help="Hugging Face folder to create")
    b.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors file (default 5)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return ap


def main(argv: list[str] | None = None) -> int:
    from maskllm_megatron.launch import quiet_known_warnings, user_error

    quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from maskllm_megatron.checkpoint_folders import check_output, partial_path
    from maskllm_megatron.launch import exit_cleanly_on_sigterm, relaunch, under_torchrun
    from maskllm_megatron.megatron.parallel import ProcessGroupScope

    groups = ProcessGroupScope()
    try:
        if args.command == "hf-to-mcore":
            from maskllm_megatron.convert.hf_to_mcore import hf_to_mcore, plan

            ranks = args.tp * args.pp * args.ep
            if ranks > 1 and not under_torchrun():
                plan(args.hf, args.tp, args.pp, args.dtype, args.ep)  # fail fast, before starting ranks
                check_output(args.out, args.overwrite, "maskllm-convert", [args.hf])
                return relaunch("maskllm_megatron.convert.cli", argv, ranks, cleanup=partial_path(args.out.absolute()))
            exit_cleanly_on_sigterm()
            hf_to_mcore(args.hf, args.out, args.tp, args.pp, args.dtype, overwrite=args.overwrite, ep=args.ep)
        else:
            from maskllm_megatron.convert.mcore_to_hf import mcore_to_hf

            exit_cleanly_on_sigterm()
            mcore_to_hf(args.ckpt, args.out, int(args.max_shard_size * 2**30), overwrite=args.overwrite)
        groups.close(sync=True)
    except ValueError as e:  # ConversionError, ParallelLayoutError, ...: bad input, one line
        return user_error(f"error: {e}")
    finally:
        groups.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
