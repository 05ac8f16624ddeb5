"""GPU smoke benchmark (one process, one GPU, bf16): three timings, printed as one JSON object.

    python benchmarks/gpu_smoke.py [--json OUT.json]        # on a CUDA machine (see gpu_smoke.sh)
    python benchmarks/gpu_smoke.py --small                   # CPU dry run of the same code paths

1. layer: forward+backward of one masked ColumnParallelLinear (frozen bf16 weight, soft Gumbel
   2:4 mask; torch.compile'd Triton kernels, the hand-written one-pass Triton kernels of
   masks/triton_kernel.py, and eager) against a dense trainable one, LLaMA-7B shapes.
2. model_step: a SmolLM2-135M-shaped model (random bf16 weights: no model hub on the GPU machine, and
   timing does not depend on the values), the driver's mask-learning step (compiled / one-pass /
   eager kernels) against a dense training step of the same batch, variants interleaved, medians.
3. sparse_24: the exported 2:4 weights (``W * hard_mask(logits)``, as export writes them) through
   ``torch.sparse.to_sparse_semi_structured`` against the dense matmul (CUDA only).
Each part reports its own error instead of stopping the others.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

import torch

SMOLLM2 = dict(family="llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9,
               num_query_groups=3, kv_channels=64, vocab_size=49152, padded_vocab_size=49152,
               max_position_embeddings=8192, position_embedding="rope", rotary_base=100000.0,
               normalization="RMSNorm", norm_epsilon=1e-5, activation="swiglu", tie_word_embeddings=True)


@contextlib.contextmanager
def one_pass_kernels(on: bool):
    """``MASKLLM_TRITON_KERNEL=1`` inside (masks/triton_kernel.py: read at every call), as it was after."""
    before = os.environ.get("MASKLLM_TRITON_KERNEL")
    os.environ["MASKLLM_TRITON_KERNEL"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MASKLLM_TRITON_KERNEL"]
        else:
            os.environ["MASKLLM_TRITON_KERNEL"] = before


def has_one_pass_kernels(device: str) -> bool:
    from maskllm_megatron.masks import triton_kernel

    return device == "cuda" and triton_kernel.available()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def driver_config(micro_batch: int, seq: int):
    """A driver config (model.checkpoint / data.train are required by validation, never read here)."""
    from maskllm_megatron.run_config import TrainConfig

    return TrainConfig.from_dict({
        "model": {"checkpoint": "unused", "dtype": "bf16"}, "parallel": {"distributed_optimizer": True},
        "data": {"train": ["unused"], "seq_length": seq, "micro_batch_size": micro_batch,
                 "global_batch_size": micro_batch},
        "optim": {"lr": 5e-5, "min_lr": 5e-6}, "prior": {"method": "magnitude"}})  # logits: x10


def fused_eager_parity(layer, x: torch.Tensor, prefix: str = "fused") -> dict:
    """The fused mask kernel (compiled, or the one-pass Triton one where switched on) against the eager
    one on the same input and noise: largest differences of the output and of the logits' gradient,
    relative to their largest values."""
    res = {}
    for fused in (True, False):
        layer.fused_mask_kernel = fused
        layer.zero_grad(set_to_none=True)
        y, _ = layer(x)
        y.float().square().mean().backward()
        res[fused] = (y.detach().float(), layer.mask_logits.grad.detach().float().clone())
    (y_f, g_f), (y_e, g_e) = res[True], res[False]
    return {f"{prefix}_vs_eager_out_rel": ((y_f - y_e).abs().max() / y_e.abs().max()).item(),
            f"{prefix}_vs_eager_logit_grad_rel": ((g_f - g_e).abs().max() / g_e.abs().max()).item()}


def profile_table(fn, device: str, steps: int = 3) -> str:
    """torch.profiler's per-kernel table of ``steps`` calls of ``fn`` (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25)


def bench_layer(device: str, shapes, tokens: int, repeats: int, profile_to: str | None = None) -> list[dict]:
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from maskllm_megatron.masks import MaskConfig
    from maskllm_megatron.megatron.layers import MaskedColumnParallelLinear

    out = []
    for rows, cols in shapes:
        cfg = TransformerConfig(num_layers=1, hidden_size=cols, num_attention_heads=8, params_dtype=torch.bfloat16,
                                bf16=True, use_cpu_initialization=device == "cpu")
        kw = dict(config=cfg, init_method=torch.nn.init.normal_, bias=False)
        dense = ColumnParallelLinear(cols, rows, **kw).to(device)
        masked = MaskedColumnParallelLinear(cols, rows, mask_config=MaskConfig(), mask_layer_id="smoke", **kw).to(device)
        masked.set_mask_step(MaskConfig().step_state(10))
        x = torch.randn(tokens, 1, cols, device=device, dtype=torch.bfloat16)

        def step(layer):
            def run():
                layer.zero_grad(set_to_none=True)
                y, _ = layer(x.detach().requires_grad_(True))
                y.float().sum().backward()
            return run

        parity = fused_eager_parity(masked, x)
        t_dense = timed(step(dense), device, repeats)
        masked.fused_mask_kernel = True
        t_fused = timed(step(masked), device, repeats)
        if profile_to:
            with open(profile_to, "a") as f:
                f.write(f"== masked layer {rows}x{cols}, {tokens} tokens, fused kernel, 3 steps ==\n"
                        f"{profile_table(step(masked), device)}\n")
        one_pass = {}
        if has_one_pass_kernels(device):
            with one_pass_kernels(True):
                one_pass.update(fused_eager_parity(masked, x, "one_pass"))
                masked.fused_mask_kernel = True
                t_one = timed(step(masked), device, repeats)
                one_pass.update(one_pass_ms=t_one * 1e3, one_pass_over_dense=t_one / t_dense)
                if profile_to:
                    with open(profile_to, "a") as f:
                        f.write(f"== masked layer {rows}x{cols}, {tokens} tokens, one-pass Triton kernels, 3 steps ==\n"
                                f"{profile_table(step(masked), device)}\n")
        masked.fused_mask_kernel = False
        t_eager = timed(step(masked), device, repeats)
        out.append({"rows": rows, "cols": cols, "tokens": tokens, "dense_ms": t_dense * 1e3, "fused_ms": t_fused * 1e3,
                    "eager_ms": t_eager * 1e3, "fused_over_dense": t_fused / t_dense, "eager_over_dense": t_eager / t_dense,
                    **parity, **one_pass})
    return out


def bench_model_step(device: str, layers: int, micro_batch: int, seq: int, repeats: int) -> dict:
    from maskllm_megatron.megatron.model_builder import ModelConfig, build_gpt_model
    from maskllm_megatron.megatron.sparsify import sparsify
    from maskllm_megatron.train.setup import apply_prior, build_optimizer
    from maskllm_megatron.train.step import run_batches

    cfg = driver_config(micro_batch, seq)
    mc = ModelConfig(**dict(SMOLLM2, num_layers=layers))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mc.vocab_size, (micro_batch, seq + 1), generator=gen)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(micro_batch, seq),
             "position_ids": torch.arange(seq).expand(micro_batch, seq)}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["attention_mask"] = None  # causal, as the driver passes it

    def build(masked: bool):
        model = build_gpt_model(mc, mc.to_transformer_config(1, 1, "bf16")).to(device)
        masks = sparsify(model, cfg.sparsify_config()) if masked else None
        if masked:
            apply_prior(cfg, model, None)
        return (masks, *build_optimizer(cfg, model, masks))

    variants = {"dense": build(False), "mask": build(True)}

    def step(name: str):
        masks, ddp, opt, sched = variants["mask" if name.startswith("mask") else "dense"]

        def run():
            if masks is not None:
                masks.set_fused_kernel(name in ("mask_fused", "mask_one_pass"))
            os.environ["MASKLLM_TRITON_KERNEL"] = "1" if name == "mask_one_pass" else "0"
            ddp.zero_grad_buffer()
            opt.zero_grad()
            sample = (lambda mb: masks.step(100, mb, 1.0)) if masks is not None else None
            run_batches(cfg, ddp, [batch], 1, forward_only=False, sample_masks=sample)
            opt.step()
            sched.step(increment=1)
        return run

    names = ("dense", "mask_fused", "mask_eager") + (("mask_one_pass",) if has_one_pass_kernels(device) else ())
    runs = {n: step(n) for n in names}
    with one_pass_kernels(False):  # restores the variable after
        for n in names:  # warm-up (Triton compilation)
            runs[n]()
            runs[n]()
        times = {n: [] for n in names}
        for r in range(repeats):
            for n in names[r % len(names):] + names[:r % len(names)]:
                times[n].append(timed(runs[n], device, 1, warmup=0))
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"layers": layers, "micro_batch": micro_batch, "seq": seq, "median_ms": {n: v * 1e3 for n, v in med.items()},
            **{f"{n[5:]}_over_dense": med[n] / med["dense"] for n in names if n != "dense"},
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None}


def timed_loop(fn, iters: int = 50) -> float:
    """Mean seconds per call of ``fn`` over ``iters`` back-to-back calls between two synchronisations
    (GPU throughput; a host-side cost per call shows up only where it exceeds the kernel time)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def bench_sparse_24(shapes, tokens: list[int], repeats: int) -> list[dict]:
    """The exported 2:4 weight through both of torch's semi-structured backends (cuSPARSELt, CUTLASS)
    against the dense matmul of the same masked weight."""
    from megatron.core.transformer import TransformerConfig
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from maskllm_megatron.masks import MaskConfig, is_valid_nm
    from maskllm_megatron.megatron.layers import MaskedColumnParallelLinear

    out = []
    for rows, cols in shapes:
        cfg = TransformerConfig(num_layers=1, hidden_size=cols, num_attention_heads=8, params_dtype=torch.bfloat16,
                                bf16=True)
        layer = MaskedColumnParallelLinear(cols, rows, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                           mask_config=MaskConfig(), mask_layer_id="smoke24").cuda()
        mask = layer.hard_mask()
        if not is_valid_nm(mask, MaskConfig().nm):
            raise AssertionError("hard mask is not 2:4")
        with torch.no_grad():
            w = (layer.weight * mask).contiguous()  # the exported 2:4 weight
        for backend in ("cusparselt", "cutlass"):
            SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
            try:
                ws = to_sparse_semi_structured(w)
            except Exception as e:  # a backend missing from this build
                out.append({"rows": rows, "cols": cols, "backend": backend, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            for n in tokens:
                x = torch.randn(n, cols, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    ref = torch.nn.functional.linear(x, w)
                    err = ((torch.nn.functional.linear(x, ws) - ref).abs().max() / ref.abs().max()).item()
                    t_dense = timed_loop(lambda: torch.nn.functional.linear(x, w), repeats)
                    t_sparse = timed_loop(lambda: torch.nn.functional.linear(x, ws), repeats)
                out.append({"rows": rows, "cols": cols, "tokens": n, "backend": type(ws).__name__,
                            "dense_ms": t_dense * 1e3, "sparse_ms": t_sparse * 1e3, "speedup": t_dense / t_sparse,
                            "max_rel_diff": err})
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return out


def transformer_engine_status() -> dict:
    """Whether Transformer Engine is importable here. sparsify() masks megatron-core's own
    Column/RowParallelLinear (the local spec); TE's fused linears are not converted."""
    try:
        import transformer_engine
    except Exception as e:  # not installed, or a broken install
        return {"installed": False, "why": f"{type(e).__name__}: {e}"[:300]}
    return {"installed": True, "version": getattr(transformer_engine, "__version__", "?"),
            "note": "sparsify() converts the local spec's linears only; the TE spec is not masked"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="also write the JSON here")
    p.add_argument("--profile", help="append torch.profiler tables of the fused masked layer here")
    p.add_argument("--small", action="store_true", help="tiny sizes (CPU dry run of the code paths)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.small:
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --small for a CPU dry run")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29561")
    from maskllm_megatron.train.setup import setup_parallel

    setup_parallel(driver_config(1, 128))
    if args.small:
        layer_shapes, layer_tokens, model = [(256, 128)], 64, dict(layers=2, micro_batch=1, seq=64, repeats=2)
        sparse_shapes, sparse_tokens, reps = [(256, 128)], [128], 2
    else:
        layer_shapes, layer_tokens, model = [(4096, 4096), (11008, 4096)], 8192, \
            dict(layers=30, micro_batch=8, seq=2048, repeats=5)
        sparse_shapes, sparse_tokens, reps = [(4096, 4096), (11008, 4096), (4096, 11008), (1536, 576)], [512, 8192, 32768], 50
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "dtype": "bf16"}
    parts = {"layer": lambda: bench_layer(device, layer_shapes, layer_tokens, reps, args.profile),
             "model_step": lambda: bench_model_step(device, model["layers"], model["micro_batch"], model["seq"],
                                                    model["repeats"]),
             "sparse_24": (lambda: bench_sparse_24(sparse_shapes, sparse_tokens, reps)) if device == "cuda"
             else (lambda: {"skipped": "semi-structured sparse kernels need CUDA"})}
    parts["transformer_engine"] = transformer_engine_status
    for name, fn in parts.items():
        t0 = time.time()
        try:
            results[name] = fn()
        except Exception as e:  # report and go on with the other parts
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        print(f"[gpu_smoke] {name} done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            f.write(text)
        os.replace(args.json + ".tmp", args.json)
    return 1 if any(isinstance(v, dict) and "error" in v for v in results.values()) else 0


if __name__ == "__main__":
    rc = main()
    from maskllm_megatron.megatron.parallel import teardown
    teardown(sync=True)  # every process group gone before the interpreter shuts down
    sys.exit(rc)
