"""HF <-> megatron-core conversion of tiny random models of every supported architecture:
logits equal transformers' at TP=1 and TP=2 (and via a PP=2 checkpoint), and HF -> mcore -> HF is
bit-identical (Nemotron's LayerNorm1p weights excepted: they pass through w + 1 - 1 in fp32)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from maskllm_megatron.megatron.model_builder import RopeScaling
from tests.torchrun_util import torchrun

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "scripts" / "convert_parity.py")
VOCAB = 250  # not a multiple of 128: exercises vocabulary padding
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)
SMALL_MOE = {**{k: v for k, v in SMALL.items() if k != "intermediate_size"}, "num_key_value_heads": 2}


def tiny_models() -> dict[str, object]:
    """name -> a transformers config of a tiny model."""
    from transformers import (GPT2Config, LlamaConfig, MistralConfig, MixtralConfig, NemotronConfig, Qwen2Config,
                              Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig)

    return {
        # SmolLM2-like: grouped-query attention, tied embeddings.
        "llama_gqa_tied": LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
        # LLaMA-3-like: untied head, llama3 RoPE scaling that touches low, medium and high frequencies.
        "llama3_untied": LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        # q/k/v/o biases without MLP biases (megatron-core gets zero MLP biases).
        "llama_attn_bias": LlamaConfig(**SMALL, attention_bias=True),
        # Qwen2: q/k/v biases only.
        "qwen2": Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64),
        "gpt2_untied": GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=4, n_positions=64,
                                  tie_word_embeddings=False),
        # Llama 3.2: tied embeddings with llama3 RoPE scaling.
        "llama32_tied": LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        # Qwen3: QK-norm, head_dim 32 given explicitly (not hidden / heads = 16); tied (0.6B-like) and untied.
        "qwen3_tied": Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
        "qwen3_untied": Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        # Mistral: no sliding window (v0.2+), and a real one of 8 tokens over the 32-token test sequences.
        "mistral": MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=None),
        "mistral_window8": MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=8),
        # Mixture of experts (4 experts, top-2): Mixtral (renormalised top-k), Qwen3-MoE (QK-norm, norm_topk_prob:
        # renormalised), Qwen2-MoE (softmax over all experts, not renormalised; a gated shared expert).
        "mixtral": MixtralConfig(**SMALL_MOE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": Qwen3MoeConfig(**SMALL_MOE, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                    num_experts_per_tok=2, norm_topk_prob=True),
        "qwen2_moe": Qwen2MoeConfig(**SMALL_MOE, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                    num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=True),
        # Nemotron: squared ReLU, LayerNorm1p, partial RoPE, untied.
        "nemotron": NemotronConfig(**SMALL, num_key_value_heads=2, head_dim=16, norm_eps=1e-5,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "partial_rotary_factor": 0.5}),
    }


def save_tiny(name: str, config, folder: Path) -> Path:
    """Random model with every parameter perturbed (biases and norm weights non-trivial), fp32."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(zlib.crc32(name.encode()))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder / name)
    return folder / name


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("convert")
    for name, cfg in tiny_models().items():
        save_tiny(name, cfg, work / "hf")
    return work


def _results(out: str) -> dict[str, dict]:
    rows = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    return {r["model"]: r for r in rows}


@pytest.fixture(scope="module")
def results_tp1(workdir) -> dict[str, dict]:
    return _results(torchrun(WORKER, str(workdir), "1", "--bf16-model", "llama3_untied", nproc=1))


@pytest.fixture(scope="module")
def results_tp2(workdir) -> dict[str, dict]:
    return _results(torchrun(WORKER, str(workdir), "2", "--pp-model", "llama3_untied", "--pp-model", "llama_gqa_tied",
                             *[a for m in MOE for a in ("--ep-model", m)], nproc=2))


NAMES = list(tiny_models())
MOE = ["mixtral", "qwen3_moe", "qwen2_moe"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_transformers(name, tp, results_tp1, results_tp2):
    r = (results_tp1 if tp == 1 else results_tp2)[name]
    assert r["shape"][0] == r["shape"][1] == [2, 32, VOCAB]
    assert r["logit_scale"] > 0.1  # the comparison is not between near-zero outputs
    assert r["max_abs_diff"] <= 1e-4, r


@pytest.mark.parametrize("name", ["llama3_untied", "llama_gqa_tied"])
def test_pipeline_parallel_checkpoint_matches(results_tp2, name):
    """A checkpoint written at TP=1 x PP=2 loads at TP=2 with the same logits (tied: the last stage's
    copy of the embedding is all-reduced from the first stage's)."""
    assert results_tp2[name]["pp2_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("name", MOE)
def test_moe_at_expert_parallel_2_matches_transformers(results_tp2, name):
    """Converted at TP=1 x EP=2 (each rank reads and saves its 2 of the 4 experts; tokens reach the other
    rank's experts through megatron's all-gather dispatcher on gloo): logits equal transformers'. The same
    model converted at TP=2 loads at EP=2, and the EP=2 checkpoint at TP=2, with the same logits. Router
    numerics: megatron runs the router's linear, softmax and top-k in fp32 (transformers: the linear in the
    model's dtype, the softmax in fp32): at fp32 the logits agree to ~1.5e-6."""
    r = results_tp2[name]
    assert r["ep2_max_abs_diff"] <= 1e-4, r
    assert r["ep2_vs_tp_max_abs_diff"] <= 1e-5 and r["tp_ckpt_at_ep2_max_abs_diff"] <= 1e-5, r
    assert r["ep2_ckpt_at_tp_max_abs_diff"] <= 1e-5, r


def test_bf16_checkpoint(results_tp1):
    """--dtype bf16: the export equals the HF weights cast to bf16, bit for bit; logits stay close."""
    r = results_tp1["llama3_untied"]
    assert r["bf16_roundtrip"] == {"missing": [], "extra": [], "different": {}}
    assert 1e-4 < r["bf16_max_abs_diff"] < 0.1  # really computed in bf16, and still the same model


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tp", [1, 2])
def test_roundtrip_bit_identical(name, tp, results_tp1, results_tp2):
    r = (results_tp1 if tp == 1 else results_tp2)[name]
    assert r["export_max_abs_diff"] <= (1e-5 if name == "nemotron" else 0.0)  # from_pretrained loads the export
    rt = r["roundtrip"]
    assert rt["missing"] == [] and rt["extra"] == []
    different = rt["different"]
    if name == "nemotron":
        # w -> w + 1 -> w in fp32 rounds at the scale of 1.0 (<= 2^-22): nothing else may differ.
        assert all(("layernorm" in k or k.endswith("norm.weight")) and d <= 2 ** -22 for k, d in different.items())
    else:
        assert different == {}


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *args],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def test_cli_tp2_then_export_at_tp1_loads_in_transformers(workdir, tmp_path):
    """The command line: hf-to-mcore --tp 2 launches its own ranks; mcore-to-hf in one process
    reshards TP=2 -> TP=1; the export loads with from_pretrained and predicts the same logits."""
    from transformers import AutoModelForCausalLM

    hf = workdir / "hf" / "gpt2"
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    r = _cli("hf-to-mcore", "--hf", str(hf), "--out", str(ckpt), "--tp", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads((ckpt / "model_config.json").read_text())
    assert info["tp"] == 2 and info["model"]["family"] == "gpt" and info["model"]["padded_vocab_size"] == 256
    r = _cli("mcore-to-hf", "--ckpt", str(ckpt), "--out", str(back), "--max-shard-size", str(100_000 / 2**30))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (back / "model.safetensors.index.json").is_file()  # several shards of <= 100 kB
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1
    tokens = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(hf).eval()(tokens).logits
        b = AutoModelForCausalLM.from_pretrained(back).eval()(tokens).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_model_config_and_hf_config_round_trip(name):
    """config.json -> ModelConfig -> config.json (with and without the original) -> the same
    ModelConfig, and transformers accepts the written config."""
    from transformers import AutoConfig

    from maskllm_megatron.convert.io import ConversionError
    from maskllm_megatron.convert.mapping import hf_config_from_model_config, model_config_from_hf

    original = tiny_models()[name].to_dict()
    mc = model_config_from_hf(original)
    assert mc.vocab_size == VOCAB and mc.padded_vocab_size == 256
    for base in (original, None):
        if base is None and name == "qwen2":
            continue  # without the original, a q/k/v-bias-only model has no LLaMA config: see below
        d = hf_config_from_model_config(mc, base, "fp32")
        assert model_config_from_hf(d) == mc
        loaded = AutoConfig.for_model(**d)
        assert model_config_from_hf(loaded.to_dict()) == mc
    if name == "qwen2":
        with pytest.raises(ConversionError, match="export as qwen2"):
            hf_config_from_model_config(mc, None, "fp32")


@pytest.mark.parametrize("name, theta, scaling, partial", [
    ("llama3_untied", 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, None),
    ("nemotron", 10000.0, None, 0.5),
    ("llama_gqa_tied", 10000.0, None, None),
])
def test_written_config_has_the_rope_keys_transformers_4_reads(name, theta, scaling, partial):
    """transformers 4 (and serving stacks pinned to it) read top-level rope_theta / rope_scaling /
    partial_rotary_factor and ignore rope_parameters: without them a LLaMA-3 export would load with
    base 10000 and no scaling. Both styles are written, and they agree."""
    from maskllm_megatron.convert.mapping import hf_config_from_model_config, model_config_from_hf

    original = tiny_models()[name].to_dict()
    for base in (original, None):
        d = hf_config_from_model_config(model_config_from_hf(original), base, "fp32")
        assert (d["rope_theta"], d["rope_scaling"], d.get("partial_rotary_factor")) == (theta, scaling, partial)
        assert d["rope_parameters"] == {"rope_theta": theta, "rope_type": "default", **(scaling or {}),
                                        **({"partial_rotary_factor": partial} if partial else {})}
    # a hub-style (transformers 4) config reads as the same model as the new style
    legacy = {k: v for k, v in d.items() if k != "rope_parameters"}
    assert model_config_from_hf(legacy) == model_config_from_hf(original)


# config.json files as transformers 4.x wrote them for the released models (sizes shrunk): top-level rope_theta
# and rope_scaling, torch_dtype; no rope_parameters.
_V4 = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           max_position_embeddings=64, hidden_act="silu", torch_dtype="bfloat16", transformers_version="4.51.3")
CONFIGS_V4 = {
    "qwen3": (dict(_V4, model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32, intermediate_size=96,
                   rms_norm_eps=1e-6, rope_theta=1000000, rope_scaling=None, attention_bias=False,
                   use_sliding_window=False, sliding_window=None, max_window_layers=28, tie_word_embeddings=True),
              dict(qk_layernorm=True, kv_channels=32, rotary_base=1e6, tie_word_embeddings=True)),
    "mistral": (dict(_V4, model_type="mistral", architectures=["MistralForCausalLM"], head_dim=None,
                     intermediate_size=96, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None),
                dict(sliding_window=None, kv_channels=16, rotary_base=1e6)),
    "mistral_v01": (dict(_V4, model_type="mistral", architectures=["MistralForCausalLM"], intermediate_size=96,
                         rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=16),
                    dict(sliding_window=16)),
    "mixtral": (dict(_V4, model_type="mixtral", architectures=["MixtralForCausalLM"], intermediate_size=32,
                     rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
                     router_aux_loss_coef=0.02, output_router_logits=False),
                dict(num_experts=8, moe_topk=2, moe_pre_softmax=False, ffn_hidden_size=32, rotary_base=1e6)),
    "qwen3_moe": (dict(_V4, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], head_dim=32,
                       intermediate_size=96, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=4,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
                       rope_theta=1e6, rope_scaling=None, attention_bias=False, use_sliding_window=False),
                  dict(num_experts=8, moe_topk=4, moe_pre_softmax=False, ffn_hidden_size=16, qk_layernorm=True)),
    "qwen2_moe": (dict(_V4, model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], intermediate_size=96,
                       moe_intermediate_size=16, shared_expert_intermediate_size=64, num_experts=8,
                       num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                       rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False),
                  dict(num_experts=8, moe_topk=4, moe_pre_softmax=True, shared_expert_size=64, shared_expert_gate=True,
                       qkv_bias=True)),
    "llama32": (dict(_V4, model_type="llama", architectures=["LlamaForCausalLM"], head_dim=16, intermediate_size=96,
                     rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, mlp_bias=False,
                     attention_bias=False, rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                         "original_max_position_embeddings": 8192,
                                                         "rope_type": "llama3"}),
                dict(tie_word_embeddings=True, rotary_base=5e5, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192))),
}


@pytest.mark.parametrize("name", sorted(CONFIGS_V4))
def test_transformers_4_and_5_configs_read_as_the_same_model(name):
    """A config.json written by transformers 4.x reads as the model it describes, and as the same model
    once transformers 5.x has loaded and re-written it (5.x moves rope_theta into rope_parameters)."""
    from transformers import AutoConfig

    from maskllm_megatron.convert.mapping import model_config_from_hf

    v4, expected = CONFIGS_V4[name]
    mc = model_config_from_hf(v4)
    assert {k: getattr(mc, k) for k in expected} == expected
    v5 = AutoConfig.for_model(**v4).to_dict()
    assert "rope_parameters" in v5 and "rope_theta" not in v5  # really the 5.x style
    assert model_config_from_hf(v5) == mc


def test_gpt2_names_without_transformer_prefix(workdir, tmp_path):
    """GPT-2 files from the hub store ``h.0...``/``wte.weight`` without ``transformer.``: same plan."""
    from safetensors.torch import load_file, save_file

    from maskllm_megatron.convert.hf_to_mcore import plan

    src = workdir / "hf" / "gpt2"
    dst = tmp_path / "gpt2-hub"
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, dst / "model.safetensors")
    a, b = plan(src), plan(dst)
    assert b.unused == [] and a.model == b.model
    for rule in b.rules.values():
        for name in rule.hf:
            assert torch.equal(a.hf.read(name), b.hf.read(name)), name
