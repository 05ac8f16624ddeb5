"""Compressed N:M linears (maskllm_megatron.inference): the kernels against F.linear on the zero-filled
dense weight, compress() on an exported model (same greedy tokens), maskllm-generate, and the refusals."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from maskllm_megatron.inference import CompressedNMLinear, CompressError, compress
from maskllm_megatron.inference import kernel
from maskllm_megatron.inference.linear import KERNEL_MAX_TOKENS, TOLERANCE, compress_weight
from maskllm_megatron.masks.cpu_kernel import runnable_isas
from maskllm_megatron.masks.patterns import NMSpec, topn_mask

ISAS = runnable_isas()
pytestmark = pytest.mark.skipif(not ISAS, reason="the compressed N:M kernel needs an x86-64 CPU with AVX2")

SHAPES = [(7, 12), (5, 1028), (33, 64), (3, 8)]  # (out, in): tails only, a long tail, whole chunks, one chunk half


def _nm_weight(out_f, in_f, spec, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * topn_mask(torch.rand(out_f, in_f, generator=g), spec)
    w[0, : spec.m] = 0.0  # a group with fewer than N non-zeros
    return w.to(dtype)


def _check(y, x, w, bias):
    """|y - ref| within TOLERANCE (ref: fp32 F.linear on the zero-filled weight)."""
    a, b = TOLERANCE[w.dtype]
    ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    scale = (x.float().abs() @ w.float().abs().t()) + (0 if bias is None else bias.float().abs())
    err = (y.float() - ref).abs()
    assert y.dtype == w.dtype and y.shape == ref.shape
    assert bool((err <= a * scale + b * ref.abs() + 1e-30).all()), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_f_linear(isa, nm, dtype):
    spec = NMSpec(*nm)
    g = torch.Generator().manual_seed(1)
    for out_f, in_f in SHAPES:
        if in_f % spec.m:
            continue
        w = _nm_weight(out_f, in_f, spec, dtype)
        for with_bias in (False, True):
            lin = torch.nn.Linear(in_f, out_f, bias=with_bias, dtype=dtype)
            lin.weight.data.copy_(w)
            layer = CompressedNMLinear.from_linear(lin, spec, "probe", isa=isa)
            assert torch.equal(layer.to_dense(), w)  # exact: the zero-filled weight, bit for bit
            # kernel: 1 block, 2 blocks of 8 tokens; sparse GEMM: 1 to 3 panels of 64 (AVX-512) or 32 tokens;
            # the forward past the kernel's limit
            for tokens in (1, 3, 8, 11, KERNEL_MAX_TOKENS[dtype] + 1, 70):
                x = torch.randn(tokens, in_f, generator=g).to(dtype)
                _check(layer(x), x, w, lin.bias)
                _check(layer.sparse_forward(x), x, w, lin.bias)
                _check(layer.sparse_gemm(x), x, w, lin.bias)
                _check(layer.tiled_forward(x, tile_rows=4), x, w, lin.bias)
            assert layer.sparse_gemm(x[:0]).shape == (0, out_f)
            x3 = torch.randn(2, 3, in_f, generator=g).to(dtype)  # [batch, seq, in]
            assert layer(x3).shape == (2, 3, out_f)
            if dtype == torch.float32:  # and against F.linear on the dense weight as it is
                torch.testing.assert_close(layer(x3), lin(x3), rtol=1e-5, atol=1e-5)


def test_both_instruction_sets_agree():
    if len(ISAS) < 2:
        pytest.skip("this CPU runs only " + ", ".join(ISAS))
    spec = NMSpec(2, 4)
    w = _nm_weight(64, 256, spec, torch.float32)
    lin = torch.nn.Linear(256, 64, bias=False)
    lin.weight.data.copy_(w)
    x = torch.randn(5, 256)
    layers = [CompressedNMLinear.from_linear(lin, spec, isa=isa) for isa in ISAS]
    assert [kernel.built_isa(isa) for isa in ISAS] == list(ISAS)
    torch.testing.assert_close(layers[0](x), layers[1](x), rtol=1e-5, atol=1e-5)
    x = torch.randn(70, 256)
    torch.testing.assert_close(layers[0].sparse_gemm(x), layers[1].sparse_gemm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_helper_threads(monkeypatch, dtype):
    """Layers large enough to share their rows with the kernel's helper threads, at 2 and 3 threads (more
    threads than cores: a helper that is not scheduled must not matter)."""
    monkeypatch.setattr("maskllm_megatron.inference.linear.PARALLEL_MIN_WEIGHTS", 0)
    spec = NMSpec(2, 4)
    w = _nm_weight(300, 256, spec, dtype)  # 76,800 weights: over the C++ floor of 65,536
    lin = torch.nn.Linear(256, 300, dtype=dtype)
    lin.weight.data.copy_(w)
    layer = CompressedNMLinear.from_linear(lin, spec)
    threads = torch.get_num_threads()
    try:
        for n in (2, 3):
            torch.set_num_threads(n)
            for _ in range(20):
                for tokens in (1, 8, KERNEL_MAX_TOKENS[dtype] + 1, 70):
                    x = torch.randn(tokens, 256).to(dtype)
                    _check(layer(x), x, w, lin.bias)
                    _check(layer.sparse_gemm(x), x, w, lin.bias)
    finally:
        torch.set_num_threads(threads)


PAIRS = bool(ISAS) and kernel.has_pairs(ISAS[-1])


def test_forward_path_by_tokens_and_dtype(monkeypatch):
    """The measured rule: the decode kernel up to 32 tokens in fp32, and in bf16 up to 8 where the pair GEMM runs
    (2:4, AVX512-BF16), else 16; beyond, the sparse GEMM in fp32, the pair GEMM or the tiled torch.mm in bf16
    (the forward calls the path that ``path`` names)."""
    spec = NMSpec(2, 4)
    lin = torch.nn.Linear(64, 16, bias=False)
    lin.weight.data.copy_(_nm_weight(16, 64, spec, torch.float32))
    methods = {"gemm": "sparse_gemm", "pairs": "pair_gemm", "tiled": "tiled_forward"}
    for dtype, last_kernel, beyond in ((torch.float32, 32, "gemm"),
                                       (torch.bfloat16, 8 if PAIRS else 16, "pairs" if PAIRS else "tiled")):
        layer = CompressedNMLinear.from_linear(lin.to(dtype), spec)
        assert [layer.path(t) for t in (1, 8, last_kernel, last_kernel + 1, 512)] == ["kernel"] * 3 + [beyond] * 2
        called = []
        for name in ("sparse_forward", *methods.values()):
            monkeypatch.setattr(layer, name, lambda x, *a, name=name, **k: called.append(name) or
                                torch.zeros(x.numel() // 64, 16, dtype=dtype))
        for tokens in (last_kernel, last_kernel + 1):
            layer(torch.zeros(1, tokens, 64, dtype=dtype))
        assert called == ["sparse_forward", methods[beyond]]


@pytest.mark.skipif(not PAIRS, reason="the pair GEMM needs AVX512-BF16")
def test_pair_gemm_matches_f_linear(monkeypatch):
    """bf16 2:4 by vdpbf16ps on the kept pairs: rows not a multiple of 16, groups not a multiple of 16 and
    past one span (256 groups), token blocks of 16 with a tail, a bias, the helper threads."""
    monkeypatch.setattr("maskllm_megatron.inference.linear.PARALLEL_MIN_WEIGHTS", 0)
    spec = NMSpec(2, 4)
    g = torch.Generator().manual_seed(2)
    for out_f, in_f in SHAPES + [(300, 256), (37, 4100)]:
        w = _nm_weight(out_f, in_f, spec, torch.bfloat16)
        for with_bias in (False, True):
            lin = torch.nn.Linear(in_f, out_f, bias=with_bias, dtype=torch.bfloat16)
            lin.weight.data.copy_(w)
            layer = CompressedNMLinear.from_linear(lin, spec)
            for tokens in (1, 15, 16, 17, 70):
                x = torch.randn(tokens, in_f, generator=g).to(torch.bfloat16)
                _check(layer.pair_gemm(x), x, w, lin.bias)
            assert layer.pair_gemm(x[:0]).shape == (0, out_f)


@pytest.mark.skipif(not PAIRS, reason="the pair GEMM needs AVX512-BF16")
def test_pair_gemm_off(monkeypatch):
    """MASKLLM_NM_PAIRS=0, the AVX2 build and other N:M take the tiled path; pair_gemm refuses them."""
    spec = NMSpec(2, 4)
    w = _nm_weight(40, 64, spec, torch.bfloat16)
    lin = torch.nn.Linear(64, 40, dtype=torch.bfloat16)
    lin.weight.data.copy_(w)
    x = torch.randn(40, 64).to(torch.bfloat16)
    layers = [CompressedNMLinear.from_linear(lin, spec, isa="AVX2")]
    w14 = _nm_weight(40, 64, NMSpec(1, 4), torch.bfloat16)
    lin14 = torch.nn.Linear(64, 40, dtype=torch.bfloat16)
    lin14.weight.data.copy_(w14)
    layers.append(CompressedNMLinear.from_linear(lin14, NMSpec(1, 4)))
    monkeypatch.setenv("MASKLLM_NM_PAIRS", "0")
    layers.append(CompressedNMLinear.from_linear(lin, spec))
    for layer, weight in zip(layers, (w, w14, w)):
        assert layer.path(40) == "tiled" and layer.path(16) == "kernel"  # without the pair GEMM: 16 tokens
        _check(layer(x), x, weight, layer.bias)
        with pytest.raises(CompressError, match="pair GEMM runs bf16 2:4"):
            layer.pair_gemm(x)


def test_forced_isa_environment(monkeypatch):
    monkeypatch.setenv("MASKLLM_NM_ISA", "AVX2")
    assert kernel.default_isa() == "AVX2"
    monkeypatch.setenv("MASKLLM_NM_ISA", "SSE2")
    with pytest.raises(kernel.KernelUnavailable, match="MASKLLM_NM_ISA=SSE2"):
        kernel.default_isa()


def test_storage_and_resident_bytes():
    spec = NMSpec(2, 4)
    w = _nm_weight(96, 256, spec, torch.float32)
    lin = torch.nn.Linear(256, 96)
    lin.weight.data.copy_(w)
    layer = CompressedNMLinear.from_linear(lin, spec)
    assert layer.values.shape == (96, 128) and layer.idx.shape == (96, 32) and layer.idx.dtype == torch.uint8
    # 8.5 B per group of 4 fp32 weights instead of 16, plus the bias
    assert layer.resident_bytes() == 96 * 64 * 8.5 + 96 * 4
    assert layer.resident_bytes() / (96 * 256 * 4 + 96 * 4) < 0.54
    four_eight = compress_weight(_nm_weight(4, 16, NMSpec(4, 8), torch.float32), NMSpec(4, 8))[1]
    assert four_eight.shape == (4, 2)  # C(8,4) = 70 patterns: one byte per group
    bf = CompressedNMLinear.from_linear(lin.to(torch.bfloat16), spec)
    assert bf.values.dtype == torch.bfloat16 and bf.bias.dtype == torch.bfloat16


def test_refusals_name_the_problem():
    spec = NMSpec(2, 4)
    dense = torch.nn.Linear(8, 4)
    with pytest.raises(CompressError, match=r"layers\.3\.up_proj is not 2:4: row \d+, group \d+") as e:
        CompressedNMLinear.from_linear(dense, spec, "layers.3.up_proj")
    assert "\n" not in str(e.value)
    with pytest.raises(CompressError, match="6 inputs are not a multiple of M=4"):
        compress_weight(torch.zeros(2, 6), spec, "odd")
    with pytest.raises(CompressError, match="3:5 is not supported"):
        compress_weight(torch.zeros(2, 10), NMSpec(3, 5), "odd")
    half = torch.nn.Linear(8, 4, dtype=torch.float16)
    half.weight.data.zero_()
    with pytest.raises(CompressError, match="float16.*torch_dtype=torch.float32 or torch.bfloat16"):
        CompressedNMLinear.from_linear(half, spec, "h")
    meta = torch.nn.Linear(8, 4, device="meta")
    with pytest.raises(CompressError, match="is on meta"):
        CompressedNMLinear.from_linear(meta, spec, "m")
    ok = torch.nn.Linear(8, 4)
    ok.weight.data.zero_()
    layer = CompressedNMLinear.from_linear(ok, spec)
    with pytest.raises(CompressError, match="input is torch.float64"):
        layer(torch.zeros(1, 8, dtype=torch.float64))


# ---- end to end: a tiny Llama exported as maskllm-export apply-masks writes it -----------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from maskllm_megatron.export.apply import apply_masks
    from maskllm_megatron.export.formats import save_masks
    from maskllm_megatron.export.verify import DEFAULT_TARGETS

    root = tmp_path_factory.mktemp("nm_inference")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # sharper logits: fewer near-ties in the greedy choice
    model.save_pretrained(root / "dense")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2").save_pretrained(
        root / "dense")
    from maskllm_megatron.export.pipeline import read_safetensors

    state = read_safetensors(root / "dense")
    masks = {n: topn_mask(t.abs(), NMSpec(2, 4)) for n, t in state.items() if re.search(DEFAULT_TARGETS, n)}
    assert len(masks) == 14
    save_masks(root / "m.masks", masks, NMSpec(2, 4))
    apply_masks(root / "dense", root / "m.masks", root / "export")
    return root


def _load(folder, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _greedy(model, n=24):
    ids = torch.tensor([[1, 17, 42, 5, 60, 33]])
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compress_exported_model_same_greedy_tokens(exported, dtype):
    model = _load(exported / "export", dtype)
    before = _greedy(model)
    with torch.inference_mode():
        logits_before = model(torch.arange(1, 40).unsqueeze(0)).logits  # 39 tokens: the tiled prefill path
    report = compress(model)
    assert len(report.compressed) == 14 and report.device == "cpu" and not report.left_dense
    assert sum(isinstance(m, CompressedNMLinear) for m in model.modules()) == 14
    assert report.compressed_bytes / report.dense_bytes < (0.54 if dtype == torch.float32 else 0.57)
    assert torch.equal(_greedy(model), before)
    with torch.inference_mode():
        logits_after = model(torch.arange(1, 40).unsqueeze(0)).logits
    tol = 1e-4 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(logits_after.float(), logits_before.float(), rtol=tol, atol=tol)
    with pytest.raises(CompressError, match="compressed already"):
        compress(model)


def test_compress_refusals(exported, tmp_path):
    dense = _load(exported / "dense")
    with pytest.raises(CompressError, match="no 'sparsity' record.*maskllm-export"):
        compress(dense)
    record = json.loads((exported / "export" / "config.json").read_text())["sparsity"]
    with pytest.raises(CompressError, match=r"model\.layers\.0\.\w+\.\w+_proj is not 2:4: row 0, group 0 \(inputs 0-3\) has 4 non-zeros"):
        compress(dense, record=record)  # the dense weights are not 2:4: refused, naming the layer
    assert not any(isinstance(m, CompressedNMLinear) for m in dense.modules())  # nothing changed
    with pytest.raises(CompressError, match="not in this model"):
        compress(dense, record={"structure": "2:4", "targets": ["model.layers.9.mlp.up_proj.weight"]})
    with pytest.raises(CompressError, match=r"embed_tokens \(Embedding\) is not an nn.Linear"):
        compress(dense, record={"structure": "2:4", "targets": ["model.embed_tokens.weight"]})
    half = _load(exported / "export", torch.float16)
    with pytest.raises(CompressError, match="float16 on cpu.*float32 or bfloat16"):
        compress(half)


def test_generate_cli(exported, tmp_path, capsys):
    from maskllm_megatron.inference.cli import main

    out = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    assert main(["--hf", str(exported / "export"), "--prompt", "w5 w9 w11", "--new-tokens", "8", "--threads", "1",
                 "--prefill", "20", "--json", str(out)]) == 0
    torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "greedy tokens identical: yes" in printed and "MiB" in printed
    result = json.loads(out.read_text())
    assert result["tokens_identical"] and result["compressed_linears"] == 14 and result["threads"] == 1
    assert result["memory_ratio"] < 0.54 and result["prefill_tokens"] == 20
    assert result["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY")  # in-process: the caller's setting
    # as a program it runs with OpenMP's idle workers asleep, unless the environment chose a policy
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for policy in (None, "ACTIVE"):
        run = subprocess.run([sys.executable, "-m", "maskllm_megatron.inference.cli", "--hf", str(exported / "export"),
                              "--new-tokens", "2", "--threads", "1", "--json", str(out)], capture_output=True,
                             text=True, env=dict(env, **({"OMP_WAIT_POLICY": policy} if policy else {})))
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads(out.read_text())["omp_wait_policy"] == (policy or "PASSIVE")
    for argv, message in ((["--hf", str(exported / "dense")], "no 'sparsity' record"),
                          (["--hf", str(tmp_path / "nowhere")], "not a Hugging Face model folder"),
                          (["--hf", str(exported / "export"), "--new-tokens", "0"], "at least 1")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
