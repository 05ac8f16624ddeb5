"""Perplexity with the WikiText-2 protocol of SparseGPT / Wanda / MaskLLM (the ``maskllm-eval`` command).

The text is joined with "\\n\\n", tokenised once (no special tokens), cut into non-overlapping windows
of the model's sequence length (remainder dropped) and PPL = exp(mean token NLL). Options: ``stride``
for overlapping windows where only the tokens no earlier window scored are scored; ``bos`` to start
every window with BOS (then every text token of a window is scored, the first one predicted from BOS);
``bos_once`` for one BOS before the whole text, which is what SparseGPT's and Wanda's scripts get from a
LLaMA tokenizer's default encoding (use it to compare with their published LLaMA figures);
``max_tokens`` to use only the first tokens of the text.

Two model paths share the window cutter and the NLL function, so they give the same number for the
same model and text: a Hugging Face folder (dense, or an exported sparse one) through transformers,
and a megatron-core checkpoint (converted, exported ``mcore``, or a mask-learning run checkpoint, which
is evaluated with its hard masks, or with ``--use-prior`` its prior masks) at any TP under torchrun.

``--corpus`` names an offline text of ``assets`` (``assets.CORPORA``: the demo's held-out Wikipedia and
Shakespeare splits), which owns the texts; this module owns the protocol only.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ..assets import CORPORA

IGNORE = -100


class EvalError(ValueError):
    """A bad request or input (message: problem and fix)."""


def read_text(text_file: Optional[Path] = None, jsonl: Optional[Path] = None, json_key: str = "text",
              corpus: Optional[str] = None) -> str:
    """The text from exactly one source: a plain file, a JSONL file's ``json_key`` field (records joined
    with "\\n\\n") or a named corpus."""
    if sum(x is not None for x in (text_file, jsonl, corpus)) != 1:
        raise EvalError("give exactly one text source: --text-file, --jsonl or --corpus")
    if corpus is not None:
        from ..assets import corpus_text

        return corpus_text(corpus)
    path = Path(text_file or jsonl)
    if not path.is_file():
        raise EvalError(f"text file {path} does not exist")
    if text_file is not None:
        return path.read_text(encoding="utf-8")
    docs = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalError(f"{path}:{i}: invalid JSON ({e.msg}): --jsonl takes one JSON object a line; "
                                    "use --text-file for plain text") from None
                if not isinstance(record, dict) or json_key not in record:
                    keys = sorted(record) if isinstance(record, dict) else "not an object"
                    raise EvalError(f"{path}:{i} has no key {json_key!r}: pass --json-key (keys: {keys})")
                if not isinstance(record[json_key], str):
                    raise EvalError(f"{path}:{i}: {json_key!r} is a {type(record[json_key]).__name__}, not text: "
                                    "pass --json-key naming the text field")
                docs.append(record[json_key])
    return "\n\n".join(docs)


# ------------------------------------------------------------------------------------ protocol
@dataclass(frozen=True)
class WindowConfig:
    """How the token stream is cut. ``stride`` None: non-overlapping windows."""

    seq_len: int
    stride: Optional[int] = None
    bos_id: Optional[int] = None
    max_tokens: Optional[int] = None

    @property
    def context(self) -> int:
        """Text tokens per window (one slot goes to BOS when set)."""
        return self.seq_len - (self.bos_id is not None)

    def __post_init__(self):
        if self.context < 1 or (self.bos_id is None and self.seq_len < 2):
            raise EvalError(f"--seq-len {self.seq_len} leaves no token to score: use at least 2")
        if self.stride is not None and not 1 <= self.stride <= self.context:
            raise EvalError(f"--stride {self.stride} must be in [1, {self.context}] (the text tokens per window)")


def iter_windows(ids: Sequence[int] | torch.Tensor, cfg: WindowConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(tokens, targets)`` of each window in turn, both [seq_len]: ``targets[i]`` is the token that
    follows position i when it is scored, else ``IGNORE``. Each text token is scored at most once; the
    windows that do not fit whole are dropped. Windows are made as they are used, so a small stride
    over a long text does not hold them all in memory."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if cfg.max_tokens is not None:
        ids = ids[: cfg.max_tokens]
    ctx, stride, bos = cfg.context, cfg.stride or cfg.context, cfg.bos_id is not None
    if len(ids) < ctx:
        raise EvalError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}: give more text or a "
                        f"smaller --seq-len")
    scored_until = 0  # text tokens before this index are scored already (or cannot be)
    for begin in range(0, len(ids) - ctx + 1, stride):
        end = begin + ctx
        text = ids[begin:end]
        window = torch.cat([torch.tensor([cfg.bos_id]), text]) if bos else text
        target = torch.full_like(window, IGNORE)
        first = max(scored_until, begin + (0 if bos else 1))  # text index of the first token scored here
        # the token at text index j sits at window position j - begin + bos and is predicted one earlier
        offset = begin - int(bos) + 1
        target[first - offset:end - offset] = ids[first:end]
        yield window, target
        scored_until = end


def cut_windows(ids: Sequence[int] | torch.Tensor, cfg: WindowConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All windows of ``iter_windows`` stacked: ``(tokens, targets)``, both [windows, seq_len]."""
    tokens, targets = zip(*iter_windows(ids, cfg))
    return torch.stack(tokens), torch.stack(targets)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> tuple[float, int]:
    """(sum of NLL over the scored positions, their count); ``logits`` [b, s, >= vocab_size] are cut to
    the tokenizer's vocabulary (megatron pads it) and computed in fp32."""
    logits = logits[..., :vocab_size].float()
    nll = F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    return float(nll), int((targets != IGNORE).sum())


def perplexity_from_nll(total_nll: float, num_tokens: int) -> float:
    """exp(mean token NLL)."""
    if num_tokens <= 0:
        raise EvalError("no token was scored")
    return math.exp(total_nll / num_tokens)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean token NLL (nats)
    tokens: int  # tokens scored
    windows: int
    seq_len: int
    stride: Optional[int]
    bos: bool
    text_tokens: int
    seconds: float = 0.0
    model: str = ""
    bos_once: bool = False  # one BOS before the whole text (counted in text_tokens)

    def summary(self) -> str:
        mode = f"stride {self.stride}" if self.stride else "non-overlapping"
        bos = ", BOS" if self.bos else ", BOS once" if self.bos_once else ""
        return (f"PPL {self.ppl:.4f} (mean NLL {self.nll:.5f}) on {self.tokens:,} tokens scored in {self.windows} "
                f"windows of {self.seq_len} ({mode}{bos}; text {self.text_tokens:,} tokens), "
                f"model {self.model}, {self.seconds:.1f}s")


def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], ids: Sequence[int], cfg: WindowConfig,
             vocab_size: int, batch_size: int = 1) -> PerplexityResult:
    """Perplexity of ``forward`` (tokens [b, s] -> logits [b, s, v]) on the token stream ``ids``."""
    t0 = time.time()
    windows = iter_windows(ids, cfg)
    total, count, num_windows = 0.0, 0, 0
    with torch.no_grad():
        while batch := list(itertools.islice(windows, batch_size)):
            tokens, targets = (torch.stack(part) for part in zip(*batch))
            nll, n = token_nll(forward(tokens), targets, vocab_size)
            total, count, num_windows = total + nll, count + n, num_windows + len(batch)
    n_text = len(ids) if cfg.max_tokens is None else min(len(ids), cfg.max_tokens)
    return PerplexityResult(perplexity_from_nll(total, count), total / count, count, num_windows, cfg.seq_len,
                            cfg.stride, cfg.bos_id is not None, n_text, time.time() - t0)


# ------------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate and how (``seq_len`` None: the model's maximum sequence length)."""

    text: str
    seq_len: Optional[int] = None
    stride: Optional[int] = None
    bos: bool = False
    max_tokens: Optional[int] = None
    batch_size: int = 1
    bos_once: bool = False

    def __post_init__(self):  # checked before a model loads
        if self.bos and self.bos_once:
            raise EvalError("--bos (BOS before every window) and --bos-once (one BOS before the text) exclude "
                            "each other: pass one")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise EvalError(f"--max-tokens {self.max_tokens} must be >= 1 (leave it out to use the whole text)")
        if self.batch_size < 1:
            raise EvalError(f"--batch-size {self.batch_size} must be >= 1")

    def token_ids(self, tokenizer) -> list[int]:
        """The token stream the windows are cut from."""
        ids = tokenizer.encode(self.text)
        return [tokenizer.bos_id, *ids] if self.bos_once else ids


def _window_config(req: EvalRequest, tokenizer, model_max_len: int) -> WindowConfig:
    for flag, wanted in (("--bos", req.bos), ("--bos-once", req.bos_once)):
        if wanted and tokenizer.bos_id is None:
            raise EvalError(f"{flag}: the tokenizer {tokenizer.path} has no BOS token; drop {flag}")
    if req.seq_len is not None and req.seq_len > model_max_len:
        raise EvalError(f"--seq-len {req.seq_len} exceeds the model's maximum sequence length "
                        f"{model_max_len} (max_position_embeddings): pass --seq-len {model_max_len} or less")
    return WindowConfig(model_max_len if req.seq_len is None else req.seq_len, req.stride,
                        tokenizer.bos_id if req.bos else None, req.max_tokens)


def hf_perplexity(folder: str | Path, req: EvalRequest) -> PerplexityResult:
    """Perplexity of a Hugging Face model folder (loaded by transformers in its own dtype)."""
    from transformers import AutoModelForCausalLM

    from maskllm_megatron.checkpoint_folders import MEGATRON_METADATA, MODEL_CONFIG_FILE
    from maskllm_megatron.data.tokenizer import load_tokenizer

    folder = Path(folder)
    if not folder.exists():
        raise EvalError(f"{folder} does not exist: pass a Hugging Face model folder to --hf")
    if any((folder / name).is_file() for name in (MEGATRON_METADATA, MODEL_CONFIG_FILE)):  # even a damaged one
        raise EvalError(f"{folder} is a megatron-core checkpoint: pass it as --ckpt")
    if not (folder / "config.json").is_file():
        raise EvalError(f"{folder} has no config.json: pass a Hugging Face model folder to --hf")
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    cfg = _window_config(req, tokenizer, model.config.max_position_embeddings)
    result = evaluate(lambda t: model(t).logits, req.token_ids(tokenizer), cfg, model.config.vocab_size,
                      req.batch_size)
    result.model, result.bos_once = str(folder), req.bos_once
    return result


def checkpoint_model_config(path: str | Path):
    """The architecture (``ModelConfig``) of a converted, exported or run checkpoint, without its weights."""
    from maskllm_megatron.convert.checkpoint import CheckpointInfo
    from maskllm_megatron.run_folder import is_run_checkpoint
    from maskllm_megatron.run_checkpoint import RunCheckpoint

    return RunCheckpoint.open(path).info.model if is_run_checkpoint(path) else CheckpointInfo.load(path).model


def load_mcore_for_eval(path: str | Path, use_prior: bool = False):
    """(model with gathered logits, ModelConfig, tokenizer folder) of a converted, exported or run
    checkpoint at the initialised layout; a run checkpoint forwards with its hard (or prior) masks."""
    from maskllm_megatron.checkpoint_folders import TOKENIZER_DIR
    from maskllm_megatron.convert.checkpoint import load_mcore_model
    from maskllm_megatron.run_folder import is_run_checkpoint
    from maskllm_megatron.run_checkpoint import RunCheckpoint, load_masked_model

    if is_run_checkpoint(path):
        run = RunCheckpoint.open(path)
        return load_masked_model(run, use_prior=use_prior, parallel_output=False), run.info.model, \
            run.base / TOKENIZER_DIR
    if use_prior:
        raise EvalError(f"--use-prior needs a mask-learning run checkpoint; {path} is not one")
    model, info = load_mcore_model(path, parallel_output=False)
    return model, info.model, Path(path) / TOKENIZER_DIR


def mcore_perplexity(path: str | Path, req: EvalRequest, use_prior: bool = False) -> PerplexityResult:
    """Perplexity of a megatron-core checkpoint on every rank of a TP-sized world (PP=1)."""
    import torch.distributed as dist

    from maskllm_megatron.data.tokenizer import load_tokenizer
    from maskllm_megatron.megatron.model_builder import gpt_forward
    from maskllm_megatron.megatron.parallel import init_parallel

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    init_parallel(tp=world, pp=1)
    model, mc, tok_dir = load_mcore_for_eval(path, use_prior)
    tokenizer = load_tokenizer(tok_dir)
    cfg = _window_config(req, tokenizer, mc.max_position_embeddings)
    result = evaluate(lambda t: gpt_forward(model, t), req.token_ids(tokenizer), cfg, mc.vocab_size,
                      req.batch_size)
    result.model, result.bos_once = str(path) + (" (prior masks)" if use_prior else ""), req.bos_once
    return result


# ------------------------------------------------------------------------------------ command line
EXAMPLES = """examples:
  maskllm-eval --hf out/smollm2-2of4-hf --corpus wikipedia-heldout --seq-len 512 --bos --max-tokens 8192
  maskllm-eval --ckpt runs/smollm2/checkpoints --corpus wikipedia-heldout --seq-len 512 --bos
  maskllm-eval --ckpt runs/smollm2/checkpoints --use-prior --tp 2 --text-file wiki.test.txt
  maskllm-eval --ckpt ckpt/llama-tp2 --jsonl test.jsonl --json-key text --seq-len 4096
"""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="maskllm-eval", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Perplexity with the WikiText-2 protocol (SparseGPT / Wanda / MaskLLM).")
    model = ap.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf", type=Path, help="Hugging Face model folder (dense or exported sparse)")
    model.add_argument("--ckpt", type=Path, help="megatron-core checkpoint: converted, exported, or a run checkpoint")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size for --ckpt (default 1)")
    ap.add_argument("--use-prior", action="store_true", help="run checkpoint: use the prior masks, not the argmax "
                    "(a prior-only checkpoint, saved at iteration 0, needs it)")
    text = ap.add_mutually_exclusive_group(required=True)
    text.add_argument("--text-file", type=Path, help="plain text file")
    text.add_argument("--jsonl", type=Path, help="JSONL file; records joined with blank lines")
    text.add_argument("--corpus", choices=CORPORA,
                      help="bundled text: the *-heldout ones are never trained on by the demo or the benchmarks; "
                           "shakespeare is the whole package, which the quality benchmark's transfer trains on")
    ap.add_argument("--json-key", default="text", help="field of --jsonl records (default text)")
    ap.add_argument("--seq-len", type=int, help="window length (default: the model's maximum sequence length)")
    ap.add_argument("--stride", type=int, help="overlapping windows this many tokens apart; only new tokens scored")
    ap.add_argument("--bos", action="store_true", help="start every window with BOS")
    ap.add_argument("--bos-once", action="store_true",
                    help="one BOS before the whole text (SparseGPT/Wanda's LLaMA evaluation)")
    ap.add_argument("--max-tokens", type=int, help="use only the first N tokens of the text")
    ap.add_argument("--batch-size", type=int, default=1, help="windows per forward (default 1)")
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON line 'RESULT {...}'")
    return ap


def main(argv: list[str] | None = None) -> int:
    from maskllm_megatron.launch import quiet_known_warnings, user_error

    quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from maskllm_megatron.launch import exit_cleanly_on_sigterm, relaunch, under_torchrun
    from maskllm_megatron.megatron.parallel import ProcessGroupScope
    from maskllm_megatron.run_folder import is_run_checkpoint
    from maskllm_megatron.run_checkpoint import RunCheckpoint

    errors = (ValueError, OSError)  # bad input: every error class for it derives from ValueError
    groups = ProcessGroupScope()
    try:
        if args.hf is not None and (args.tp != 1 or args.use_prior):
            raise EvalError("--tp and --use-prior apply to --ckpt (megatron-core) only")
        if args.ckpt is not None and is_run_checkpoint(args.ckpt):  # before any rank starts
            RunCheckpoint.open(args.ckpt).check_mask_source(args.use_prior, "evaluate")
        if args.tp > 1 and not under_torchrun():
            checkpoint_model_config(args.ckpt).validate_parallel(args.tp, 1)  # fail fast, before starting ranks
            return relaunch("maskllm_megatron.eval.perplexity", argv, args.tp)
        req = EvalRequest(read_text(args.text_file, args.jsonl, args.json_key, args.corpus), args.seq_len,
                          args.stride, args.bos, args.max_tokens, args.batch_size, args.bos_once)
        if args.hf is not None:
            result = hf_perplexity(args.hf, req)
        else:
            exit_cleanly_on_sigterm()
            result = mcore_perplexity(args.ckpt, req, args.use_prior)
            groups.close(sync=True)
    except errors as e:
        return user_error(f"error: {e}")
    finally:
        groups.close()
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.summary())
        if args.json:
            print("RESULT " + json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
