"""Worker for tests/test_export.py and tests/test_perplexity.py (torchrun, gloo).

usage: export_worker.py MODE WORKDIR
  make  (TP=2) convert WORKDIR/hf (a tiny random LLaMA) -> WORKDIR/base; sparsify, magnitude prior, changed
        logits, optimizer -> run checkpoint WORKDIR/run/checkpoints/iter_0000003; reference logits of the
        masked model (argmax and prior) and mcore perplexities -> WORKDIR/ref.pt; every export format at TP=2
  tp1   (TP=1, one process) exports of the TP=2 run through the CLI, a TP=1 reload, perplexities at TP=1, and a
        planted violation that must fail the export and leave nothing behind
Prints one line ``RESULT {...}``.
"""
import contextlib
import io
import json
import sys
from pathlib import Path

import torch

WINDOW = dict(seq_len=32, bos=True, max_tokens=600)


def tokens():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 1000, (2, 24), generator=g)


def logits_of(model):
    from maskllm_megatron.megatron.model_builder import gpt_forward

    with torch.no_grad():
        return gpt_forward(model.eval(), tokens()).float()


def text():
    from maskllm_megatron.assets import botchan_text

    return botchan_text()[:6000]


def ppl(path, use_prior=False):
    from maskllm_megatron.eval.perplexity import EvalRequest, mcore_perplexity

    return mcore_perplexity(path, EvalRequest(text(), **WINDOW), use_prior).ppl


def make(work: Path) -> dict:
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from maskllm_megatron.convert.checkpoint import CheckpointInfo

    from maskllm_megatron.megatron.parallel import init_parallel
    from maskllm_megatron.convert.hf_to_mcore import hf_to_mcore
    from maskllm_megatron.export.pipeline import ExportConfig, export
    from maskllm_megatron.masks import MaskConfig
    from maskllm_megatron.megatron.checkpointing import load_checkpoint, save_checkpoint
    from maskllm_megatron.megatron.model_builder import build_gpt_model, gpt_forward
    from maskllm_megatron.megatron.sparsify import SparsifyConfig, masked_layers, sparsify
    from maskllm_megatron.prune.methods import magnitude_mask

    with contextlib.redirect_stdout(io.StringIO()):
        hf_to_mcore(work / "hf", work / "base", tp=2, show_progress=False)
    init_parallel(2, 1)
    rank = dist.get_rank()
    info = CheckpointInfo.load(work / "base")
    cfg = SparsifyConfig(mask=MaskConfig(nm="2:4", total_steps=10))
    model = build_gpt_model(info.model, info.model.to_transformer_config(2, 1, "fp32", perform_initialization=False),
                            parallel_output=False)
    masks = sparsify(model, cfg)
    load_checkpoint(model, work / "base")
    dense_logits = logits_of(model.eval())  # logits at their initial N(0, 0.01): a random mask, not dense
    g = torch.Generator().manual_seed(11 + rank)
    flipped = 0
    with torch.no_grad():
        for layer in masked_layers(model):
            layer.set_prior(magnitude_mask(layer.weight, layer.nm))
            before = layer.hard_mask()
            layer.mask_logits.add_(0.03 * torch.randn(layer.mask_logits.shape, generator=g))
            flipped += int((layer.hard_mask() != before).sum())
    # a few optimizer steps so that the run checkpoint holds real Adam state
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, weight_decay=0.1), [ddp],
                                 config_overrides=masks.optimizer_overrides(lr=1e-3))
    model.train()
    ddp.zero_grad_buffer()
    opt.zero_grad()
    gpt_forward(ddp, tokens()[:, :-1], tokens()[:, 1:]).mean().backward()
    ddp.finish_grad_sync()
    opt.step()
    model.eval()
    run_cfg = {"model": {"checkpoint": str(work / "base"), "dtype": "auto"},
               "mask": {"nm": "2:4", "include": list(cfg.include), "exclude": list(cfg.exclude)}}
    run = save_checkpoint(model, work / "run" / "checkpoints" / "iter_0000003", opt,
                          extra={"iteration": 3, "config": run_cfg})
    if rank == 0:
        (run.parent / "latest").write_text(run.name)
    ref = logits_of(model)
    for layer in masked_layers(model):
        layer.set_mask_mode("prior")
    ref_prior = logits_of(model)
    del ddp, opt, model

    summaries = {}
    for fmt, name, prior in [("mcore", "mcore_tp2", False), ("hf", "hf_tp2", False), ("hf", "hf_prior", True),
                             ("compressed-tensors", "ct_tp2", False), ("masks", "masks_tp2.safetensors", False)]:
        result = export(ExportConfig(work / "run" / "checkpoints", work / name, fmt, prior))
        if result is not None:
            summaries[name] = result.summary()
            summaries[name + ":bytes"] = [result.bytes, result.dense_bytes, result.bits_per_weight, result.sparsity]
    # the exported mcore checkpoint through the converter's dense loader (any TP): the masked model's logits
    from maskllm_megatron.convert.checkpoint import load_mcore_model

    exported, _ = load_mcore_model(work / "mcore_tp2", parallel_output=False)
    exported_diff = float((logits_of(exported) - ref).abs().max())
    ppls = {"run": ppl(work / "run" / "checkpoints"), "run_prior": ppl(work / "run" / "checkpoints", True),
            "mcore_export": ppl(work / "mcore_tp2"), "base": ppl(work / "base")}
    if rank == 0:
        torch.save({"ref": ref, "ref_prior": ref_prior, "dense": dense_logits, "tokens": tokens()}, work / "ref.pt")
    return {"flipped": flipped, "exported_diff": exported_diff, "prior_vs_learned": float((ref - ref_prior).abs().max()),
            "ppl_tp2": ppls, "summaries": summaries}


def tp1(work: Path) -> dict:
    from maskllm_megatron.convert.checkpoint import load_mcore_model
    from maskllm_megatron.megatron.parallel import init_parallel
    from maskllm_megatron.export import trim
    from maskllm_megatron.export.cli import main

    ref = torch.load(work / "ref.pt")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["--ckpt", str(work / "run" / "checkpoints" / "iter_0000003"), "--out", str(work / "mcore_tp1"),
                   "--format", "mcore"])
        rc_masks = main(["--ckpt", str(work / "run"), "--out", str(work / "masks_tp1.safetensors"), "--format", "masks"])
    init_parallel(1, 1)
    exported, _ = load_mcore_model(work / "mcore_tp1", parallel_output=False)
    diff = float((logits_of(exported) - ref["ref"]).abs().max())
    # loaded into a sparsified model, the export's masks come back as prior masks
    from maskllm_megatron.convert.checkpoint import CheckpointInfo
    from maskllm_megatron.run_checkpoint import RunCheckpoint, load_masked_model

    run = RunCheckpoint.open(work / "run")
    learned = load_masked_model(run, parallel_output=False)
    learned_diff = float((logits_of(learned) - ref["ref"]).abs().max())
    prior_diff = float((logits_of(load_masked_model(run, use_prior=True, parallel_output=False))
                        - ref["ref_prior"]).abs().max())
    ppls = {"run": ppl(work / "run" / "checkpoints"), "run_prior": ppl(work / "run" / "checkpoints", True),
            "mcore_export": ppl(work / "mcore_tp1"), "base": ppl(work / "base")}
    # a planted violation (masks not applied): the verifier fails the export and nothing is left behind
    real = trim.apply_mask_hf
    trim.apply_mask_hf = lambda w, m: w.clone()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc_bad = main(["--ckpt", str(work / "run"), "--out", str(work / "bad_hf"), "--format", "hf"])
        rc_bad_mcore = main(["--ckpt", str(work / "run"), "--out", str(work / "bad_mcore"), "--format", "mcore"])
    trim.apply_mask_hf = real
    leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith((".bad", "bad")))
    # errors are one line, exit 2
    with contextlib.redirect_stderr(io.StringIO()) as e1:
        rc_exists = main(["--ckpt", str(work / "run"), "--out", str(work / "mcore_tp1"), "--format", "mcore"])
    with contextlib.redirect_stderr(io.StringIO()) as e2:
        rc_notrun = main(["--ckpt", str(work / "base"), "--out", str(work / "x"), "--format", "hf"])
    info = CheckpointInfo.load(work / "mcore_tp1")
    return {"rc": [rc, rc_masks], "diff": diff, "learned_diff": learned_diff, "prior_diff": prior_diff,
            "ppl_tp1": ppls, "stdout": out.getvalue(), "rc_bad": [rc_bad, rc_bad_mcore], "bad_err": err.getvalue(),
            "leftovers": leftovers, "rc_exists": rc_exists, "err_exists": e1.getvalue(), "rc_notrun": rc_notrun,
            "err_notrun": e2.getvalue(), "tp_saved": info.tp,
            "sparsity_json": json.loads((work / "mcore_tp1" / "sparsity.json").read_text())}


if __name__ == "__main__":
    mode, work = sys.argv[1], Path(sys.argv[2])
    result = {"make": make, "tp1": tp1}[mode](work)
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
