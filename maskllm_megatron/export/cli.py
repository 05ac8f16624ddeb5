"""``maskllm-export``: a mask-learning checkpoint -> a 2:4 (N:M) model or mask file.

Launching: with ``--tp N`` (N > 1) launched plainly, the request is checked, then the command
re-launches itself under ``torchrun --nproc-per-node N``; under torchrun it uses the given ranks.
Errors print one line, ``error: <problem>: <fix>``, exit with status 2 and leave no output behind.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from maskllm_megatron.launch import exit_cleanly_on_sigterm, relaunch, under_torchrun, user_error

EXAMPLES = """examples:
  maskllm-export --ckpt runs/smollm2/checkpoints/iter_0000200 --out out/smollm2-2of4-hf --format hf
  maskllm-export --ckpt runs/llama/checkpoints --out out/llama-2of4-ct --format compressed-tensors --tp 2
  maskllm-export --ckpt runs/llama/checkpoints --out out/llama-2of4-mcore --format mcore
  maskllm-export --ckpt runs/llama/checkpoints --out out/sparsegpt-prior.masks --format masks --use-prior
  maskllm-export --ckpt runs/smollm2/checkpoints --out out/smollm2-2of4-recon --format hf --reconstruct \\
      --calib-samples 128                 # refit the kept weights on the run's own training data
  maskllm-export --ckpt runs/llama/checkpoints --out out/llama-2of4-recon --format hf --reconstruct \\
      --calib-data /data/c4_llama2_text_document --calib-samples 128 --calib-seq-len 4096
  maskllm-export apply-masks --hf models/llama --masks out/llama.masks --out out/llama-2of4-hf
"""


def _export_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="maskllm-export", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a mask-learning checkpoint with its hard (argmax) N:M masks applied, verified. "
                    "Run 'maskllm-export apply-masks --help' to apply a mask file to a dense HF model.")
    ap.add_argument("--ckpt", required=True, type=Path,
                    help="run checkpoint (OUT/checkpoints/iter_XXXXXXX, or a run folder: the checkpoint its "
                         "driver would resume from, the newest complete one that verifies)")
    ap.add_argument("--out", required=True, type=Path, help="folder (mask file for --format masks) to create")
    ap.add_argument("--format", required=True, choices=["mcore", "hf", "compressed-tensors", "masks"])
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load at (default 1)")
    ap.add_argument("--use-prior", action="store_true", help="export the stored prior (one-shot) masks instead "
                    "(a prior-only checkpoint, saved at iteration 0, needs it)")
    ap.add_argument("--base-ckpt", type=Path, help="the run's converted checkpoint, if it moved since training")
    ap.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors file (default 5)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    rec = ap.add_argument_group("reconstruction", "refit the kept weights under the masks so that every masked "
                                "linear reproduces its dense output on calibration samples (block by block, "
                                "as SparseGPT); the export's sparsity record says so")
    rec.add_argument("--reconstruct", action="store_true", help="reconstruct the kept weights before writing")
    rc = _reconstruct_defaults()
    rec.add_argument("--recon-method", choices=rc.methods, default=rc.config.method,
                     help="lstsq: exact per-row least squares (default); obs: SparseGPT's OBS sweep, faster; block: "
                          "each transformer block's kept weights fitted together by Adam to the dense block's output")
    rec.add_argument("--recon-target", choices=rc.targets, default=rc.config.target,
                     help="layer: match the dense layer (block) on this model's inputs (SparseGPT's); dense: the dense "
                          "model's output there, which also undoes the error of the layers before (lstsq, block)")
    rec.add_argument("--recon-epochs", type=int, default=rc.config.epochs, help="block: passes over the calibration "
                     "samples per block (default %(default)s)")
    rec.add_argument("--recon-lr", type=float, default=rc.config.lr, help="block: Adam's learning rate (default %(default)s)")
    rec.add_argument("--true-sequential", action="store_true",
                     help="solve a block's linears one at a time, each on the inputs of the ones before it solved")
    rec.add_argument("--calib-data", nargs="+", metavar="PREFIX",
                     help="indexed dataset prefix(es) (megatron's blend form: PREFIX, or W1 PREFIX1 W2 PREFIX2 ...); "
                          "default: the run's own training data")
    rec.add_argument("--calib-text", type=Path, help="a plain-text file instead, cut into windows")
    rec.add_argument("--calib-samples", type=int, default=128, help="calibration samples (default 128)")
    rec.add_argument("--calib-seq-len", type=int, help="tokens per sample (default: the run's data.seq_length)")
    rec.add_argument("--calib-batch-size", type=int, default=1, help="samples per calibration forward (default 1)")
    rec.add_argument("--percdamp", type=float, default=rc.config.percdamp,
                     help="dampening: this fraction of the Hessian's mean diagonal (default %(default)s, SparseGPT's)")
    return ap


def _reconstruct_defaults() -> argparse.Namespace:
    """The solver's defaults and choices (``megatron.configs``), for the reconstruction options."""
    from maskllm_megatron.megatron.configs import RECONSTRUCT_METHODS, RECONSTRUCT_TARGETS, ReconstructConfig

    return argparse.Namespace(config=ReconstructConfig(), methods=list(RECONSTRUCT_METHODS),
                              targets=list(RECONSTRUCT_TARGETS))


def _reconstruct_request(args):
    """The ``--reconstruct`` options as a request, or None; options without ``--reconstruct`` are refused."""
    from maskllm_megatron.export.reconstruct import ReconstructError, ReconstructRequest
    from maskllm_megatron.megatron.configs import ReconstructConfig

    given = [f"--{n.replace('_', '-')}" for n in ("calib_data", "calib_text", "calib_seq_len")
             if getattr(args, n) is not None]
    if not args.reconstruct:
        if given:
            raise ReconstructError(f"{given[0]} is a reconstruction option: add --reconstruct")
        return None
    try:
        solver = ReconstructConfig(method=args.recon_method, percdamp=args.percdamp, target=args.recon_target,
                                   true_sequential=args.true_sequential, epochs=args.recon_epochs, lr=args.recon_lr)
    except ValueError as e:
        raise ReconstructError(f"--reconstruct: {e}") from None
    return ReconstructRequest(solver=solver, samples=args.calib_samples, seq_len=args.calib_seq_len,
                              data=tuple(args.calib_data or ()), text_file=args.calib_text,
                              micro_batch_size=args.calib_batch_size)


def _apply_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="maskllm-export apply-masks", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Apply a mask file (maskllm-export --format masks, or MaskLLM's published .npz) to a dense "
                    "Hugging Face model; the result is verified.")
    ap.add_argument("--hf", required=True, type=Path, help="dense Hugging Face model folder")
    ap.add_argument("--masks", required=True, type=Path, help="mask file (.safetensors from us, or a MaskLLM .npz)")
    ap.add_argument("--out", required=True, type=Path, help="Hugging Face folder to create")
    ap.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors file (default 5)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return ap


def main(argv: list[str] | None = None) -> int:
    from maskllm_megatron.launch import quiet_known_warnings

    quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["apply-masks"]:
        args = _apply_parser().parse_args(argv[1:])
        from maskllm_megatron.export.apply import apply_masks

        try:
            result = apply_masks(args.hf, args.masks, args.out, args.overwrite, int(args.max_shard_size * 2**30))
        except (ValueError, OSError) as e:  # bad input: one line
            return user_error(f"error: {e}")
        print(result.summary())
        return 0
    args = _export_parser().parse_args(argv)
    from maskllm_megatron.checkpoint_folders import partial_path
    from maskllm_megatron.export.pipeline import ExportConfig, check_request, export
    from maskllm_megatron.megatron.parallel import ParallelLayoutError, ProcessGroupScope

    groups = ProcessGroupScope()
    try:
        cfg = ExportConfig(args.ckpt, args.out.absolute(), args.format, args.use_prior, args.base_ckpt,
                           args.overwrite, int(args.max_shard_size * 2**30), _reconstruct_request(args))
        if args.tp > 1 and not under_torchrun():
            run = check_request(cfg)  # fail fast, before starting ranks
            run.info.model.validate_parallel(args.tp, 1)
            if cfg.reconstruct is not None:
                from maskllm_megatron.export.reconstruct import plan_calibration

                plan_calibration(cfg.reconstruct, run)
            return relaunch("maskllm_megatron.export.cli", argv, args.tp,
                            cleanup=partial_path(cfg.out, "work"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != args.tp:
            raise ParallelLayoutError(f"{world} processes for --tp {args.tp}: launch with --nproc-per-node {args.tp}")
        exit_cleanly_on_sigterm()
        result = export(cfg)
        groups.close(sync=True)
    except ValueError as e:  # bad input (every error class for it derives from ValueError): one line
        return user_error(f"error: {e}")
    finally:
        groups.close()
    if result is not None:
        print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
