"""maskllm_megatron.inference.compress on a GPU: torch's semi-structured 2:4 (cuSPARSELt / CUTLASS) against the
dense linears with zeros, in bf16 and fp16. One JSON object on stdout (and --json).

    python benchmarks/gpu_nm_inference.py [--json OUT.json]    # CUDA (gpu_checks.sh step 5)
    python benchmarks/gpu_nm_inference.py --small              # CPU dry run of the same code paths

1. layers: a chain of LLaMA-2 7B's linears (4096x4096 x4, 11008x4096, 4096x11008; random 2:4 weights) as a
   model with our export's sparsity record; compress() it in place; every layer's output against F.linear
   on the dense weight (max error relative to the largest output), then the chain's time at 1 and 8
   tokens (decode) and 512 tokens (prefill), dense and compressed alternating, CUDA-event medians.
2. generate: a SmolLM2-135M-shaped LlamaForCausalLM (random weights, magnitude 2:4 on the decoder
   linears; needs transformers), greedy generate of 64 tokens at batch 1 and 8: tokens/s dense against
   compressed and whether the tokens match (random weights: near-ties can flip a token).
Each part reports its own error instead of stopping the other.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from maskllm_megatron.inference import compress
from maskllm_megatron.masks.patterns import NMSpec, topn_mask

SPEC = NMSpec(2, 4)


class Chain(nn.Module):
    def __init__(self, shapes, dtype, device):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=False, dtype=dtype, device=device) for o, i in shapes)
        with torch.no_grad():
            for lin in self.layers:
                w = torch.randn_like(lin.weight, dtype=torch.float32) / lin.in_features ** 0.5
                lin.weight.copy_((w * topn_mask(w.abs(), SPEC)).to(dtype))
        self.config = SimpleNamespace(sparsity={"structure": "2:4",
                                                "targets": [f"layers.{i}.weight" for i in range(len(shapes))]})

    def forward(self, x):
        for lin in self.layers:
            x = lin(x)
        return x


def _timer(device):
    if device == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def part_layers(dtype, device, small, repeats):
    shapes = [(64, 64)] * 4 + [(160, 64), (64, 160)] if small else [(4096, 4096)] * 4 + [(11008, 4096), (4096, 11008)]
    model = Chain(shapes, dtype, device).eval()
    dense = [lin for lin in model.layers]
    xs = [torch.randn(16, lin.in_features, dtype=dtype, device=device) for lin in dense]
    refs = [F.linear(x, lin.weight) for x, lin in zip(xs, dense)]
    report = compress(model)
    out = {"compressed": len(report.compressed), "left_dense": report.left_dense,
           "dense_bytes": report.dense_bytes, "compressed_bytes": report.compressed_bytes}
    with torch.inference_mode():
        errs = [((model.layers[i](x) - ref).abs().max() / ref.abs().max()).item() for i, (x, ref) in enumerate(zip(xs, refs))]
    out["max_rel_error"] = max(errs)
    out["correct"] = max(errs) < (2e-2 if dtype == torch.float16 else 4e-2)
    compressed = list(model.layers)
    timer = _timer(device)
    for tokens in (1, 8, 512):
        x = torch.randn(tokens, shapes[0][1], dtype=dtype, device=device)
        times = {"dense": [], "compressed": []}
        with torch.inference_mode():
            for r in range(repeats + 2):
                for kind, mods in (("dense", dense), ("compressed", compressed)):
                    model.layers = nn.ModuleList(mods)
                    t = timer(lambda: model(x))
                    if r >= 2:
                        times[kind].append(t)
        d, c = statistics.median(times["dense"]), statistics.median(times["compressed"])
        out[f"tokens_{tokens}"] = {"dense_ms": 1e3 * d, "compressed_ms": 1e3 * c, "speedup": d / c}
    model.layers = nn.ModuleList(compressed)
    return out


def part_generate(dtype, device, small, new_tokens):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256) if small else
           dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True))
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(device=device, dtype=dtype).eval()
    targets = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in (
                    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                mod.weight.mul_(topn_mask(mod.weight.float().abs(), SPEC).to(dtype))
                targets.append(name + ".weight")
    model.config.sparsity = {"structure": "2:4", "targets": targets}
    out = {}

    def gen(ids):
        with torch.inference_mode():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            o = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            return o, time.perf_counter() - t0

    dense_runs = {}
    for batch in (1, 8):
        ids = torch.randint(1, cfg["vocab_size"], (batch, 16), device=device)
        gen(ids[:, :4])
        dense_runs[batch] = (ids,) + gen(ids)
    report = compress(model)
    out["compressed"], out["left_dense"] = len(report.compressed), report.left_dense[:3]
    for batch, (ids, tokens, seconds) in dense_runs.items():
        gen(ids[:, :4])
        tokens_c, seconds_c = gen(ids)
        out[f"batch_{batch}"] = {"dense_tokens_per_s": batch * new_tokens / seconds,
                                 "compressed_tokens_per_s": batch * new_tokens / seconds_c,
                                 "speedup": seconds / seconds_c,
                                 "tokens_identical": bool(torch.equal(tokens, tokens_c))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--small", action="store_true", help="tiny shapes on the CPU (fp32 and bf16): a dry run")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    device = "cpu" if args.small else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_nm_inference.py: no CUDA device (use --small for a CPU dry run)", file=sys.stderr)
        return 2
    dtypes = (torch.float32, torch.bfloat16) if args.small else (torch.bfloat16, torch.float16)
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    ok = True
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        for part, fn in (("layers", lambda: part_layers(dtype, device, args.small, args.repeats)),
                         ("generate", lambda: part_generate(dtype, device, args.small, args.new_tokens))):
            try:
                result[f"{part}_{name}"] = fn()
                ok &= result[f"{part}_{name}"].get("correct", True)
            except Exception as e:  # noqa: BLE001 - each part reports its own failure
                result[f"{part}_{name}"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
                ok = False
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
