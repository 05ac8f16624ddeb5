"""``maskllm-generate``: greedy generation from an ``hf`` export, dense-with-zeros against compressed.

One process, one model: the masked linears are swapped between their dense modules (zeros kept) and
their compressed ones (``compress``) between runs, so both run with the same threads, dtype, prompt and
batch, alternately (``--repeats``: the median of each; a noisy neighbour on the CPU hits both alike).
It prints tokens/s of ``generate`` (new tokens x batch / wall seconds), optionally the time of one
prefill forward, the resident bytes of the masked linears' weights, and whether the greedy tokens match.
Errors print one line, ``error: <problem>: <fix>``, and exit with status 2.

Run as a program it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets a policy (it starts
itself again with it: OpenMP reads it once, when torch loads it). By default torch's OpenMP workers spin
after each op on the cores the compressed kernels' helper threads need; on 2 cores that made the
kernels' SmolLM2 decoding 1.33x dense instead of 1.80x, and its 512-token prefill 1.49x instead of 1.00x
(benchmarks/RESULTS.md). A program that calls ``compress`` itself should run under the same setting.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..launch import user_error
from .compress import compress, sparsity_record
from .kernel import KernelUnavailable
from .linear import CompressError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_PROMPT = "The history of the city begins in the twelfth century, when"

EXAMPLES = """examples:
  maskllm-generate --hf out/smollm2-2of4-hf
  maskllm-generate --hf out/smollm2-2of4-hf --new-tokens 128 --batch 8 --dtype bfloat16 --repeats 3
  maskllm-generate --hf out/llama2-7b-2of4 --prompt "Once upon a time" --prefill 512 --json speed.json
"""


class GenerateError(ValueError):
    """Bad input to maskllm-generate; the message names the problem and the fix."""


def _load(hf: Path, dtype: torch.dtype):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (hf / "config.json").is_file():
        raise GenerateError(f"{hf} is not a Hugging Face model folder (no config.json): pass the folder "
                            "maskllm-export --format hf wrote")
    sparsity_record(json.loads((hf / "config.json").read_text()))  # refuse before loading any weight
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(hf, **{key: dtype}).eval()
    return AutoTokenizer.from_pretrained(hf), model


def _swap(model: torch.nn.Module, modules: dict) -> None:
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)


def measure(hf: str | Path, prompt: str = DEFAULT_PROMPT, new_tokens: int = 32, batch: int = 1,
            dtype: str = "float32", threads: Optional[int] = None, repeats: int = 1, prefill: int = 0,
            isa: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Dense-with-zeros and compressed generation from the export ``hf``; the numbers as a dict."""
    if dtype not in DTYPES:
        raise GenerateError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if new_tokens < 1 or batch < 1 or repeats < 1 or prefill < 0:
        raise GenerateError("--new-tokens, --batch and --repeats must be at least 1, --prefill at least 0")
    if threads is not None:
        if threads < 1:
            raise GenerateError(f"--threads {threads}: pass at least 1")
        torch.set_num_threads(threads)
    hf = Path(hf)
    tokenizer, model = _load(hf, DTYPES[dtype])
    ids = tokenizer([prompt] * batch, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise GenerateError("--prompt is empty after tokenisation: pass some text")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    modules = dict(model.named_modules())
    record = sparsity_record(model.config)
    report = compress(model, isa=isa)
    compressed = {name: model.get_submodule(name) for name in report.compressed}
    dense = {name: modules[name] for name in report.compressed}

    def generate(n: int) -> tuple[torch.Tensor, float]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad)
            return out[:, ids.shape[1]:], time.perf_counter() - t0

    prefill_ids = torch.arange(prefill).remainder(model.config.vocab_size - 1).add(1).unsqueeze(0)

    def prefill_seconds() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(prefill_ids)
            return time.perf_counter() - t0

    runs = {"dense": {"tps": [], "prefill_s": []}, "compressed": {"tps": [], "prefill_s": []}}
    tokens = {}
    for kind, swap in (("dense", dense), ("compressed", compressed)):  # warm-up: kernels, allocator
        _swap(model, swap)
        generate(2)
    for r in range(repeats):
        for kind, swap in (("dense", dense), ("compressed", compressed)):
            _swap(model, swap)
            out, seconds = generate(new_tokens)
            runs[kind]["tps"].append(batch * new_tokens / seconds)
            tokens.setdefault(kind, out)
            if prefill:
                runs[kind]["prefill_s"].append(prefill_seconds())
    same = tokens["dense"] == tokens["compressed"]
    first_diff = None if bool(same.all()) else int((~same).any(0).nonzero()[0])
    result = {
        "model": str(hf), "structure": str(report.spec), "masked_linears": len(record["targets"]),
        "compressed_linears": len(report.compressed), "dtype": dtype, "threads": torch.get_num_threads(),
        "batch": batch, "prompt_tokens": ids.shape[1], "new_tokens": new_tokens, "repeats": repeats,
        "dense_tokens_per_s": statistics.median(runs["dense"]["tps"]),
        "compressed_tokens_per_s": statistics.median(runs["compressed"]["tps"]),
        "dense_runs": runs["dense"]["tps"], "compressed_runs": runs["compressed"]["tps"],
        "dense_linear_bytes": report.dense_bytes, "compressed_linear_bytes": report.compressed_bytes,
        "tokens_identical": first_diff is None, "first_different_token": first_diff,
    }
    result["speedup"] = result["compressed_tokens_per_s"] / result["dense_tokens_per_s"]
    result["memory_ratio"] = report.compressed_bytes / report.dense_bytes
    if prefill:
        result.update(prefill_tokens=prefill, dense_prefill_s=statistics.median(runs["dense"]["prefill_s"]),
                      compressed_prefill_s=statistics.median(runs["compressed"]["prefill_s"]))
        result["prefill_ratio"] = result["compressed_prefill_s"] / result["dense_prefill_s"]
    _swap(model, compressed)
    log(format_result(result))
    return result


def format_result(r: dict) -> str:
    mib = 2 ** 20
    lines = [f"{r['model']}: {r['structure']}, {r['compressed_linears']} of {r['masked_linears']} masked linears "
             f"compressed; {r['dtype']}, {r['threads']} threads, batch {r['batch']}, {r['prompt_tokens']}-token "
             f"prompt, {r['new_tokens']} new tokens, greedy, median of {r['repeats']}",
             f"  dense (zeros kept): {r['dense_tokens_per_s']:8.2f} tokens/s   masked linears "
             f"{r['dense_linear_bytes'] / mib:8.1f} MiB",
             f"  compressed:         {r['compressed_tokens_per_s']:8.2f} tokens/s   masked linears "
             f"{r['compressed_linear_bytes'] / mib:8.1f} MiB ({r['memory_ratio']:.3f}x)",
             f"  speed-up {r['speedup']:.2f}x; greedy tokens identical: "
             + ("yes" if r["tokens_identical"] else f"no, from new token {r['first_different_token']}")]
    if "prefill_tokens" in r:
        lines.append(f"  prefill of {r['prefill_tokens']} tokens: dense {r['dense_prefill_s'] * 1e3:.1f} ms, "
                     f"compressed {r['compressed_prefill_s'] * 1e3:.1f} ms ({r['prefill_ratio']:.2f}x)")
    return "\n".join(lines)


OMP_POLICY = "OMP_WAIT_POLICY"


def main(argv=None) -> int:
    if argv is None and OMP_POLICY not in os.environ:  # a program: start again with idle OpenMP workers asleep
        os.execve(sys.executable, [sys.executable, "-m", "maskllm_megatron.inference.cli", *sys.argv[1:]],
                  dict(os.environ, **{OMP_POLICY: "PASSIVE"}))
    ap = argparse.ArgumentParser(
        prog="maskllm-generate", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Greedy generation from an N:M (2:4) Hugging Face export (maskllm-export --format hf), dense "
                    "with its zeros against its compressed linears: tokens/s and the masked linears' bytes.")
    ap.add_argument("--hf", required=True, type=Path, help="the exported folder (config.json with a sparsity record)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (default: a sentence opening)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    ap.add_argument("--batch", type=int, default=1, help="copies of the prompt generated together (default 1)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating dense/compressed runs; medians (default 1)")
    ap.add_argument("--prefill", type=int, default=0, metavar="TOKENS", help="also time one forward of this many tokens")
    ap.add_argument("--isa", choices=["AVX2", "AVX512"], help="force the CPU kernel's instruction set")
    ap.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    try:
        result = measure(args.hf, args.prompt, args.new_tokens, args.batch, args.dtype, args.threads, args.repeats,
                         args.prefill, args.isa)
        result["omp_wait_policy"] = os.environ.get(OMP_POLICY)
    except (GenerateError, CompressError, KernelUnavailable, OSError) as e:
        return user_error(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
