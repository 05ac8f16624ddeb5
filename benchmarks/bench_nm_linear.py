"""Compressed N:M linears (maskllm_megatron.inference) against F.linear on the zero-filled dense weight.

  python benchmarks/bench_nm_linear.py linear [--shapes ...] [--repeats 5]
      one linear at SmolLM2-135M's and LLaMA-2 7B's shapes (out x in), random 2:4 weights: decode (1 token)
      and prefill (512 tokens), fp32 and bf16; dense and compressed take turns call by call, each figure is
      the median over --repeats rounds of the median of --calls calls, the ratio taken in the same run.
  python benchmarks/bench_nm_linear.py model [--new-tokens 128] [--batch 1 8] [--repeats 3]
      SmolLM2-135M (the demo's offline model) with magnitude 2:4 masks on its 210 decoder linears,
      written as our hf export (maskllm-export apply-masks): greedy decoding with a dense and a
      compressed copy taking turns token by token (median step times), then maskllm-generate's
      whole-generate timing (alternating runs, medians) with a 512-token prefill.
  python benchmarks/bench_nm_linear.py paths [--shapes ...] [--tokens 9 16 32 64] [--paths kernel gemm tiled]
      each forward path of the compressed layer (kernel: the decode kernel, blocks of 8 tokens; gemm: the
      sparse GEMM; tiled: decompressed tiles through torch.mm; forward: the path the layer picks) against
      F.linear, taking turns call by call: the time of each path / the dense time (the median over rounds
      of the ratio of the rounds' medians), to set the layer's crossovers (CompressedNMLinear.path);
      --threads 1 --cpu-time counts the thread's CPU time instead, robust to other processes' load.

Results: benchmarks/RESULTS.md, "Compressed 2:4 linears on the CPU".
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from maskllm_megatron.inference.linear import CompressedNMLinear
from maskllm_megatron.masks.patterns import NMSpec, topn_mask

SHAPES = {"smollm2-qkv": (960, 576), "smollm2-o": (576, 576), "smollm2-up": (1536, 576), "smollm2-down": (576, 1536),
          "llama2-7b-qkvo": (4096, 4096), "llama2-7b-up": (11008, 4096), "llama2-7b-down": (4096, 11008)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _alternate(fns: dict, calls: int, rounds: int, clock=time.perf_counter) -> dict:
    """Per function, the median over ``rounds`` of the median time of ``calls`` calls; the functions take
    turns call by call (a load spike from another process hits all of them alike)."""
    medians = {k: [] for k in fns}
    for _ in range(rounds):
        times = {k: [] for k in fns}
        for _ in range(calls):
            for k, fn in fns.items():
                t0 = clock()
                fn()
                times[k].append(clock() - t0)
        for k in fns:
            medians[k].append(statistics.median(times[k]))
    return medians


def _layers(shapes, dtypes, isa):
    """Per shape and dtype: ``(name, generator, dense weight, compressed layer)``, random 2:4 weights."""
    spec = NMSpec(2, 4)
    for name in shapes:
        out_f, in_f = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        w32 = torch.randn(out_f, in_f, generator=g) * topn_mask(torch.rand(out_f, in_f, generator=g), spec)
        for dtype in dtypes:
            w = w32.to(dtype)
            lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype)
            lin.weight.data.copy_(w)
            yield name, g, w, CompressedNMLinear.from_linear(lin, spec, isa=isa)


def bench_linear(args) -> list[dict]:
    rows = []
    for name, g, w, comp in _layers(args.shapes, (torch.float32, torch.bfloat16), args.isa):
        (out_f, in_f), dtype = w.shape, w.dtype
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, generator=g).to(dtype)
            dense_fn, comp_fn = (lambda: F.linear(x, w)), (lambda: comp(x))
            calls = args.calls if tokens <= 16 else max(3, args.calls // 10)
            dense_fn(), comp_fn()  # warm-up
            m = _alternate({"dense": dense_fn, "compressed": comp_fn}, calls, args.repeats)
            dense, compressed = m["dense"], m["compressed"]
            ratios = [d / c for d, c in zip(dense, compressed)]
            row = {"shape": name, "out": out_f, "in": in_f, "dtype": str(dtype).replace("torch.", ""),
                   "tokens": tokens, "dense_ms": 1e3 * statistics.median(dense),
                   "compressed_ms": 1e3 * statistics.median(compressed), "speedup": statistics.median(ratios),
                   "speedup_min": min(ratios), "speedup_max": max(ratios),
                   "memory_ratio": comp.resident_bytes() / (w.numel() * w.element_size())}
            rows.append(row)
            print(f"{name:15s} {out_f:5d}x{in_f:<5d} {row['dtype']:8s} {tokens:4d} tok: dense {row['dense_ms']:8.3f} ms"
                  f"  compressed {row['compressed_ms']:8.3f} ms  speed-up {row['speedup']:.2f}x "
                  f"({row['speedup_min']:.2f}-{row['speedup_max']:.2f})", flush=True)
    return rows


PATHS = {"kernel": lambda comp: comp.sparse_forward, "gemm": lambda comp: comp.sparse_gemm,
         "pairs": lambda comp: comp.pair_gemm,
         "tiled": lambda comp: comp.tiled_forward, "forward": lambda comp: comp}


def bench_paths(args) -> list[dict]:
    """Per shape, dtype and token count: each of ``args.paths`` against F.linear, in the same run."""
    rows = []
    for name, g, w, comp in _layers(args.shapes, [DTYPES[d] for d in args.dtypes], args.isa):
        (out_f, in_f), dtype = w.shape, str(w.dtype).replace("torch.", "")
        for tokens in args.tokens:
            x = torch.randn(tokens, in_f, generator=g).to(w.dtype)
            fns = {"dense": lambda: F.linear(x, w)}
            fns.update({p: (lambda f=PATHS[p](comp): f(x)) for p in args.paths})
            for fn in fns.values():
                fn()  # warm-up
            m = _alternate(fns, args.calls, args.repeats, time.thread_time if args.cpu_time else time.perf_counter)
            row = {"shape": name, "out": out_f, "in": in_f, "dtype": dtype, "tokens": tokens, "cpu_time": args.cpu_time,
                   "dense_ms": 1e3 * statistics.median(m["dense"])}
            text = []
            for p in args.paths:
                ratios = [t / d for t, d in zip(m[p], m["dense"])]
                row[f"{p}_ms"], row[f"{p}_ratio"] = 1e3 * statistics.median(m[p]), statistics.median(ratios)
                text.append(f"{p} {row[p + '_ratio']:.2f}x")
            rows.append(row)
            print(f"{name:15s} {out_f:5d}x{in_f:<5d} {dtype:8s} {tokens:4d} tok: dense {row['dense_ms']:8.3f} ms; "
                  "time / dense: " + ", ".join(text), flush=True)
    return rows


def magnitude_export(hf: Path, out: Path, spec: NMSpec = NMSpec(2, 4)) -> Path:
    """``hf`` with magnitude N:M masks on its decoder linears, as ``maskllm-export apply-masks`` writes it."""
    from maskllm_megatron.export.apply import apply_masks
    from maskllm_megatron.export.formats import save_masks
    from maskllm_megatron.export.pipeline import read_safetensors
    from maskllm_megatron.export.verify import DEFAULT_TARGETS

    if (out / "config.json").is_file():
        return out
    state = read_safetensors(hf)
    masks = {n: topn_mask(t.float().abs(), spec) for n, t in state.items() if re.search(DEFAULT_TARGETS, n)}
    mask_file = out.with_name(out.name + ".masks")
    save_masks(mask_file, masks, spec)
    apply_masks(hf, mask_file, out, overwrite=True)
    return out


def step_decode(export: Path, new_tokens: int, batch: int, dtype: str, repeats: int) -> dict:
    """Two copies of the export, one compressed; greedy decoding by hand (forward with the KV cache), the
    two taking turns token by token: tokens/s from the median step time, robust to another process's load
    changing over the seconds a whole ``generate`` takes."""
    from transformers import AutoModelForCausalLM

    from maskllm_megatron.inference import compress

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    models = {k: AutoModelForCausalLM.from_pretrained(export, dtype=torch_dtype).eval() for k in ("dense", "compressed")}
    compress(models["compressed"])
    ids = torch.arange(1, 13).repeat(batch, 1) * 97 % models["dense"].config.vocab_size
    steps = {k: [] for k in models}
    tokens = {}
    with torch.inference_mode():
        for _ in range(repeats):
            state = {}
            for k, model in models.items():
                out = model(ids, use_cache=True)
                state[k] = (out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), [])
            for _ in range(new_tokens):
                for k, model in models.items():
                    cache, nxt, seq = state[k]
                    seq.append(nxt)
                    t0 = time.perf_counter()
                    out = model(nxt, past_key_values=cache, use_cache=True)
                    steps[k].append(time.perf_counter() - t0)
                    state[k] = (out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), seq)
            for k in models:
                tokens[k] = torch.cat(state[k][2], 1)
    d, c = statistics.median(steps["dense"]), statistics.median(steps["compressed"])
    same = tokens["dense"] == tokens["compressed"]
    row = {"batch": batch, "dtype": dtype, "new_tokens": new_tokens, "repeats": repeats,
           "dense_tokens_per_s": batch / d, "compressed_tokens_per_s": batch / c, "speedup": d / c,
           "tokens_identical": bool(same.all()),
           "first_different_token": None if bool(same.all()) else int((~same).any(0).nonzero()[0])}
    print(f"step-alternating decode, batch {batch}, {dtype}: dense {row['dense_tokens_per_s']:.2f} tokens/s, "
          f"compressed {row['compressed_tokens_per_s']:.2f} tokens/s, speed-up {row['speedup']:.2f}x, greedy tokens "
          f"identical: {row['tokens_identical']}", flush=True)
    return row


def bench_model(args) -> list[dict]:
    from maskllm_megatron.assets import smollm2_hf_dir
    from maskllm_megatron.cache import cache_dir
    from maskllm_megatron.inference.cli import measure

    export = magnitude_export(smollm2_hf_dir(), cache_dir() / "bench" / "smollm2-magnitude-2of4-hf")
    rows = []
    for dtype in args.dtypes:
        for batch in args.batch:
            rows.append(step_decode(export, args.new_tokens, batch, dtype, args.repeats))
            if not args.steps_only:
                rows.append(measure(export, new_tokens=args.new_tokens, batch=batch, dtype=dtype,
                                    repeats=args.repeats, prefill=args.prefill if batch == 1 else 0, isa=args.isa))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    lin = sub.add_parser("linear")
    lin.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    lin.add_argument("--tokens", nargs="+", type=int, default=[1, 512])
    lin.add_argument("--calls", type=int, default=30)
    paths = sub.add_parser("paths")
    paths.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    paths.add_argument("--tokens", nargs="+", type=int, default=[9, 16, 32, 64])
    paths.add_argument("--paths", nargs="+", default=["kernel", "gemm", "tiled"], choices=list(PATHS))
    paths.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    paths.add_argument("--calls", type=int, default=5)
    paths.add_argument("--cpu-time", action="store_true",
                       help="time the calling thread's CPU time, not wall time (with --threads 1 only): other "
                            "processes' load then costs no time, only shared caches")
    mod = sub.add_parser("model")
    mod.add_argument("--new-tokens", type=int, default=128)
    mod.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    mod.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    mod.add_argument("--prefill", type=int, default=512)
    mod.add_argument("--steps-only", action="store_true", help="only the step-alternating decode, not generate")
    for p in (lin, paths, mod):
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--isa", choices=["AVX2", "AVX512"])
        p.add_argument("--threads", type=int)
        p.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if getattr(args, "cpu_time", False) and args.threads != 1:
        ap.error("--cpu-time counts the calling thread only: pass --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}", flush=True)
    rows = {"linear": bench_linear, "paths": bench_paths, "model": bench_model}[args.what](args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
