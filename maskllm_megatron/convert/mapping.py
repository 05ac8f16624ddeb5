"""Hugging Face <-> megatron-core tensor names and layouts, per architecture (the only place).

A ``TensorRule`` says how one megatron-core tensor (global, unsharded layout, global layer number)
is made from Hugging Face tensors and back, and how it is split over tensor-parallel ranks:

- fused QKV: per query group g, rows ``[q heads of g..., k_g, v_g]`` (megatron's layout), made from
  HF's separate q/k/v projections (LLaMA, Qwen2/3, Mistral, Nemotron) or GPT-2's fused ``c_attn`` ([q; k; v]);
- Qwen3's ``q_norm`` / ``k_norm`` (over the head dimension) are megatron's ``q_layernorm`` / ``k_layernorm``;
- SwiGLU: ``linear_fc1`` is ``[gate; up]`` globally; tensor-parallel rank r holds
  ``[gate_r; up_r]`` (layout ``SWIGLU``), as megatron's sharded state dict expects;
- GPT-2 ``Conv1D`` weights are [in, out] and are transposed;
- embeddings and the untied output layer get zero rows up to the padded vocabulary size;
- Nemotron's LayerNorm1p weight ``w`` becomes a plain LayerNorm weight ``w + 1`` (computed in fp32);
- biases megatron-core has but the architecture lacks (see ``model_builder``) are zeros, and exporting
  them refuses non-zero values.

``architecture_for(hf_config)`` picks an ``Architecture`` from a ``config.json`` dict.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from maskllm_megatron.convert.io import ConversionError
from maskllm_megatron.megatron.model_builder import ModelConfig, ModelConfigError, RopeScaling

Tensors = list[torch.Tensor]


class Layout(enum.Enum):
    """How a global megatron-core tensor is split over tensor-parallel ranks."""

    REPLICATED = "replicated"
    COLUMN = "column"  # dim 0 (column-parallel weights and biases, vocab-parallel embeddings)
    ROW = "row"  # dim 1 (row-parallel weights)
    SWIGLU = "swiglu"  # dim 0 of each half of [gate; up]

    def shard(self, t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """This rank's part of the global tensor ``t``."""
        if self is Layout.REPLICATED or tp == 1:
            return t
        if self is Layout.SWIGLU:
            gate, up = t.chunk(2, dim=0)
            return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
        return t.chunk(tp, dim=0 if self is Layout.COLUMN else 1)[rank]

    def unshard(self, parts: Tensors) -> torch.Tensor:
        """The global tensor from all ranks' parts (in rank order)."""
        if self is Layout.REPLICATED or len(parts) == 1:
            return parts[0]
        if self is Layout.SWIGLU:
            halves = [p.chunk(2, dim=0) for p in parts]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        return torch.cat(parts, dim=0 if self is Layout.COLUMN else 1)


@dataclass(frozen=True)
class TensorRule:
    """One megatron-core tensor and the Hugging Face tensors it is made from."""

    mcore: str
    hf: tuple[str, ...]  # HF names; empty when the architecture has no such tensor (held at zero)
    hf_shapes: tuple[tuple[int, ...], ...]
    mcore_shape: tuple[int, ...]
    layout: Layout
    to_mcore: Callable[[Tensors], torch.Tensor]
    to_hf: Callable[[torch.Tensor], Tensors]
    export: bool = True  # False for a copy of another rule's tensor (tied output layer on the last stage)


def _rule(mcore, hf, hf_shapes, mcore_shape, layout, to_mcore=None, to_hf=None, export=True) -> TensorRule:
    return TensorRule(mcore, tuple(hf), tuple(tuple(s) for s in hf_shapes), tuple(mcore_shape), layout,
                      to_mcore or (lambda ts: ts[0]), to_hf or (lambda t: [t]), export)


def _zero_rule(mcore: str, shape: tuple[int, ...], layout: Layout, what: str) -> TensorRule:
    """A megatron-core tensor with no HF counterpart: zeros in, refused unless zero out."""

    def to_hf(t: torch.Tensor) -> Tensors:
        if torch.count_nonzero(t):
            raise ConversionError(
                f"{mcore} is non-zero but the Hugging Face architecture has no {what}: "
                "export to a format that keeps it (mcore) or zero it")
        return []

    return TensorRule(mcore, (), (), shape, layout, lambda ts: torch.zeros(shape), to_hf)


# ---------------------------------------------------------------------------------------------
# Layout helpers
def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave separate q [H*d, ...], k and v [G*d, ...] into megatron's per-group [q.., k, v]."""
    rest = q.shape[1:]
    parts = [q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def qkv_to_hf(t: torch.Tensor, heads: int, groups: int, d: int) -> Tensors:
    """Inverse of ``qkv_to_mcore``: [q, k, v]."""
    rest = t.shape[1:]
    t = t.reshape(groups, (heads // groups + 2) * d, *rest)
    q_rows = heads // groups * d
    return [t[:, :q_rows].reshape(-1, *rest).contiguous(), t[:, q_rows:q_rows + d].reshape(-1, *rest).contiguous(),
            t[:, q_rows + d:].reshape(-1, *rest).contiguous()]


def _pad_rows(rows: int):
    def pad(ts: Tensors) -> torch.Tensor:
        t = ts[0]
        if t.shape[0] == rows:
            return t
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    return pad


def _unpad_rows(rows: int):
    return lambda t: [t[:rows].contiguous()]


def _plus_one(ts: Tensors) -> torch.Tensor:
    return ts[0].float() + 1.0


def _minus_one(t: torch.Tensor) -> Tensors:
    return [(t.float() - 1.0).to(t.dtype)]


def _transpose_in(ts: Tensors) -> torch.Tensor:
    return ts[0].t().contiguous()


def _transpose_out(t: torch.Tensor) -> Tensors:
    return [t.t().contiguous()]


# ---------------------------------------------------------------------------------------------
# Rules
def _embedding_rules(mc: ModelConfig, embed: str, head: str, pos: str | None) -> list[TensorRule]:
    V, P, h = mc.vocab_size, mc.padded_vocab_size, mc.hidden_size
    rules = [_rule("embedding.word_embeddings.weight", [embed], [(V, h)], (P, h), Layout.COLUMN,
                   _pad_rows(P), _unpad_rows(V))]
    if pos is not None:
        n = mc.max_position_embeddings
        rules.append(_rule("embedding.position_embeddings.weight", [pos], [(n, h)], (n, h), Layout.REPLICATED))
    src = embed if mc.tie_word_embeddings else head
    rules.append(_rule("output_layer.weight", [src], [(V, h)], (P, h), Layout.COLUMN, _pad_rows(P),
                       _unpad_rows(V), export=not mc.tie_word_embeddings))
    return rules


def _norm_rules(mc: ModelConfig, mcore: str, hf: str, plus_one: bool = False, size: int | None = None
                ) -> list[TensorRule]:
    h = size or mc.hidden_size
    rules = [_rule(f"{mcore}.weight", [f"{hf}.weight"], [(h,)], (h,), Layout.REPLICATED,
                   _plus_one if plus_one else None, _minus_one if plus_one else None)]
    if mc.normalization == "LayerNorm":
        rules.append(_rule(f"{mcore}.bias", [f"{hf}.bias"], [(h,)], (h,), Layout.REPLICATED))
    return rules


def _bias_rule(mc: ModelConfig, mcore: str, hf: list[str], shapes, mcore_rows: int, has: bool,
               layout: Layout, to_mcore=None, to_hf=None, what: str = "") -> list[TensorRule]:
    """Bias rule when the architecture has it, zero rule when only megatron-core has it, else none."""
    if has:
        return [_rule(mcore, hf, shapes, (mcore_rows,), layout, to_mcore, to_hf)]
    return [_zero_rule(mcore, (mcore_rows,), layout, what)] if mc.add_bias_linear else []


def _llama_like_layer(mc: ModelConfig, i: int, plus_one: bool, moe: "MoENames | None" = None) -> list[TensorRule]:
    """LLaMA / Qwen2 / Qwen3 / Mistral / Nemotron / MoE decoder layer i (HF ``model.layers.i``)."""
    h, H, G, d, f = mc.hidden_size, mc.num_attention_heads, mc.num_query_groups, mc.kv_channels, mc.ffn_hidden_size
    p, a, m = f"decoder.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    qkv_rows = (H + 2 * G) * d
    qkv_in = lambda ts: qkv_to_mcore(*ts, groups=G)  # noqa: E731
    qkv_out = lambda t: qkv_to_hf(t, H, G, d)  # noqa: E731
    rules = _norm_rules(mc, p + "input_layernorm", f"model.layers.{i}.input_layernorm", plus_one)
    rules.append(_rule(p + "self_attention.linear_qkv.weight", [a + "q_proj.weight", a + "k_proj.weight",
                       a + "v_proj.weight"], [(H * d, h), (G * d, h), (G * d, h)], (qkv_rows, h),
                       Layout.COLUMN, qkv_in, qkv_out))
    rules += _bias_rule(mc, p + "self_attention.linear_qkv.bias", [a + "q_proj.bias", a + "k_proj.bias",
                        a + "v_proj.bias"], [(H * d,), (G * d,), (G * d,)], qkv_rows, mc.qkv_bias,
                        Layout.COLUMN, qkv_in, qkv_out, "q/k/v bias")
    if mc.qk_layernorm:  # Qwen3: one norm over the head dimension, shared by all heads
        rules += _norm_rules(mc, p + "self_attention.q_layernorm", a + "q_norm", plus_one, size=d)
        rules += _norm_rules(mc, p + "self_attention.k_layernorm", a + "k_norm", plus_one, size=d)
    rules.append(_rule(p + "self_attention.linear_proj.weight", [a + "o_proj.weight"], [(h, H * d)], (h, H * d),
                       Layout.ROW))
    rules += _bias_rule(mc, p + "self_attention.linear_proj.bias", [a + "o_proj.bias"], [(h,)], h, mc.proj_bias,
                        Layout.REPLICATED, what="o_proj bias")
    rules += _norm_rules(mc, p + "pre_mlp_layernorm", f"model.layers.{i}.post_attention_layernorm", plus_one)
    if mc.is_moe:
        return rules + _moe_rules(mc, i, moe or MoENames())
    return rules + _mlp_rules(mc, p + "mlp.", m, f)


def _mlp_rules(mc: ModelConfig, p: str, m: str, f: int, names=("gate_proj", "up_proj", "down_proj"),
               biases: bool = True) -> list[TensorRule]:
    """An MLP (megatron ``{p}linear_fc1/2``) from HF ``{m}{gate, up, down}.weight``; SwiGLU's [gate; up] fused."""
    h = mc.hidden_size
    gate, up, down = (m + n for n in names)
    rules = []
    if mc.gated:
        cat = lambda ts: torch.cat(ts)  # noqa: E731
        split = lambda t: [c.contiguous() for c in t.chunk(2)]  # noqa: E731
        rules.append(_rule(p + "linear_fc1.weight", [gate + ".weight", up + ".weight"],
                           [(f, h), (f, h)], (2 * f, h), Layout.SWIGLU, cat, split))
        if biases:
            rules += _bias_rule(mc, p + "linear_fc1.bias", [gate + ".bias", up + ".bias"],
                                [(f,), (f,)], 2 * f, mc.mlp_bias, Layout.SWIGLU, cat, split, "MLP bias")
    else:
        rules.append(_rule(p + "linear_fc1.weight", [up + ".weight"], [(f, h)], (f, h), Layout.COLUMN))
        if biases:
            rules += _bias_rule(mc, p + "linear_fc1.bias", [up + ".bias"], [(f,)], f, mc.mlp_bias,
                                Layout.COLUMN, what="MLP bias")
    rules.append(_rule(p + "linear_fc2.weight", [down + ".weight"], [(h, f)], (h, f), Layout.ROW))
    if biases:
        rules += _bias_rule(mc, p + "linear_fc2.bias", [down + ".bias"], [(h,)], h, mc.mlp_bias,
                            Layout.REPLICATED, what="MLP bias")
    return rules


@dataclass(frozen=True)
class MoENames:
    """Where a Hugging Face MoE block keeps its tensors: ``model.layers.i.{block}.gate.weight`` (router),
    ``...{block}.experts.{e}.{gate, up, down}.weight``, ``...{block}.shared_expert.{gate_proj, up_proj,
    down_proj}.weight`` and ``...{block}.shared_expert_gate.weight`` (Qwen2-MoE)."""

    block: str = "mlp"
    expert: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


MIXTRAL_NAMES = MoENames("block_sparse_moe", ("w1", "w3", "w2"))


def _moe_rules(mc: ModelConfig, i: int, names: MoENames) -> list[TensorRule]:
    """Layer i's MoE block -> megatron-core's MoELayer (local spec, SequentialMLP): ``mlp.router.weight``
    [E, h], expert e's MLP as ``mlp.experts.local_experts.{e}`` (e: GLOBAL expert index; a rank holds
    experts ep_rank * E/EP ...), ``mlp.shared_experts`` and its ``gate_weight`` [1, h]."""
    h, E = mc.hidden_size, mc.num_experts
    p, m = f"decoder.layers.{i}.mlp.", f"model.layers.{i}.{names.block}."
    rules = [_rule(p + "router.weight", [m + "gate.weight"], [(E, h)], (E, h), Layout.REPLICATED)]
    for e in range(E):
        rules += _mlp_rules(mc, f"{p}experts.local_experts.{e}.", f"{m}experts.{e}.", mc.ffn_hidden_size,
                            names.expert, biases=False)
    if mc.shared_expert_size is not None:
        rules += _mlp_rules(mc, p + "shared_experts.", m + "shared_expert.", mc.shared_expert_size, biases=False)
        if mc.shared_expert_gate:
            rules.append(_rule(p + "shared_experts.gate_weight", [m + "shared_expert_gate.weight"], [(1, h)], (1, h),
                               Layout.REPLICATED))
    return rules


def _llama_like_rules(mc: ModelConfig, plus_one: bool = False, moe: MoENames | None = None) -> list[TensorRule]:
    rules = _embedding_rules(mc, "model.embed_tokens.weight", "lm_head.weight", None)
    for i in range(mc.num_layers):
        rules += _llama_like_layer(mc, i, plus_one, moe)
    return rules + _norm_rules(mc, "decoder.final_layernorm", "model.norm", plus_one)


def _gpt2_rules(mc: ModelConfig) -> list[TensorRule]:
    h, H, f = mc.hidden_size, mc.num_attention_heads, mc.ffn_hidden_size
    d = mc.kv_channels
    rules = _embedding_rules(mc, "transformer.wte.weight", "lm_head.weight", "transformer.wpe.weight")
    qkv_in = lambda ts: qkv_to_mcore(*ts[0].t().chunk(3, dim=0), groups=H)  # noqa: E731  Conv1D [h, 3h]
    qkv_out = lambda t: [torch.cat(qkv_to_hf(t, H, H, d)).t().contiguous()]  # noqa: E731
    qkv_b_in = lambda ts: qkv_to_mcore(*ts[0].chunk(3), groups=H)  # noqa: E731
    qkv_b_out = lambda t: [torch.cat(qkv_to_hf(t, H, H, d))]  # noqa: E731
    for i in range(mc.num_layers):
        p, g = f"decoder.layers.{i}.", f"transformer.h.{i}."
        rules += _norm_rules(mc, p + "input_layernorm", g + "ln_1")
        rules += [
            _rule(p + "self_attention.linear_qkv.weight", [g + "attn.c_attn.weight"], [(h, 3 * h)], (3 * h, h),
                  Layout.COLUMN, qkv_in, qkv_out),
            _rule(p + "self_attention.linear_qkv.bias", [g + "attn.c_attn.bias"], [(3 * h,)], (3 * h,),
                  Layout.COLUMN, qkv_b_in, qkv_b_out),
            _rule(p + "self_attention.linear_proj.weight", [g + "attn.c_proj.weight"], [(h, h)], (h, h),
                  Layout.ROW, _transpose_in, _transpose_out),
            _rule(p + "self_attention.linear_proj.bias", [g + "attn.c_proj.bias"], [(h,)], (h,), Layout.REPLICATED),
        ]
        rules += _norm_rules(mc, p + "pre_mlp_layernorm", g + "ln_2")
        rules += [
            _rule(p + "mlp.linear_fc1.weight", [g + "mlp.c_fc.weight"], [(h, f)], (f, h), Layout.COLUMN,
                  _transpose_in, _transpose_out),
            _rule(p + "mlp.linear_fc1.bias", [g + "mlp.c_fc.bias"], [(f,)], (f,), Layout.COLUMN),
            _rule(p + "mlp.linear_fc2.weight", [g + "mlp.c_proj.weight"], [(f, h)], (h, f), Layout.ROW,
                  _transpose_in, _transpose_out),
            _rule(p + "mlp.linear_fc2.bias", [g + "mlp.c_proj.bias"], [(h,)], (h,), Layout.REPLICATED),
        ]
    return rules + _norm_rules(mc, "decoder.final_layernorm", "transformer.ln_f")


# ---------------------------------------------------------------------------------------------
# Configs
def _unsupported(what: str, fix: str) -> ConversionError:
    return ConversionError(f"unsupported model setting: {what}: {fix}")


def _rope(cfg: dict) -> tuple[float, float, RopeScaling | None]:
    """(rope base, partial rotary factor, llama3 scaling) from old- or new-style HF rope keys."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    params = {**legacy, **params}
    base = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return base, partial, None
    if kind == "llama3":
        return base, partial, RopeScaling(float(params["factor"]), float(params["low_freq_factor"]),
                                          float(params["high_freq_factor"]),
                                          int(params["original_max_position_embeddings"]))
    raise _unsupported(f"rope_type {kind!r}", "only default and llama3 RoPE are implemented")


def _rope_to_hf(mc: ModelConfig) -> dict:
    """RoPE keys in both styles: transformers 5's ``rope_parameters``, and the top-level ``rope_theta`` /
    ``rope_scaling`` / ``partial_rotary_factor`` that transformers 4 (and the serving stacks pinned to
    it) read; without those, they silently fall back to base 10000 and no scaling."""
    params: dict = {"rope_theta": mc.rotary_base, "rope_type": "default"}
    legacy: dict = {"rope_theta": mc.rotary_base, "rope_scaling": None}
    if mc.rotary_percent != 1.0:
        params["partial_rotary_factor"] = legacy["partial_rotary_factor"] = mc.rotary_percent
    if mc.rope_scaling is not None:
        s = mc.rope_scaling
        scaling = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                       high_freq_factor=s.high_freq_factor,
                       original_max_position_embeddings=s.original_max_position_embeddings)
        params.update(scaling)
        legacy["rope_scaling"] = scaling
    return {"rope_parameters": params, **legacy}


# The LLaMA-style families: (dense attention/bias variant, MoE block) per model type.
_ATTENTION = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral",
              "mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
_MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def _moe_config(cfg: dict, kind: str) -> dict:
    """ModelConfig's MoE fields from a Mixtral / Qwen2-MoE / Qwen3-MoE config.json."""
    if kind == "mixtral":  # softmax, top-k, renormalised: the softmax over the top-k logits
        experts = cfg.get("num_local_experts", cfg.get("num_experts"))
        return dict(num_experts=experts, moe_topk=cfg["num_experts_per_tok"], moe_pre_softmax=False,
                    ffn_hidden_size=cfg["intermediate_size"])
    if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise _unsupported(f"decoder_sparse_step {cfg.get('decoder_sparse_step')} / mlp_only_layers "
                           f"{cfg.get('mlp_only_layers')}", "dense MLP layers between MoE layers are not mapped; "
                           "every layer must be MoE (decoder_sparse_step 1, mlp_only_layers [])")
    shared = cfg.get("shared_expert_intermediate_size") if kind == "qwen2_moe" else None
    return dict(num_experts=cfg.get("num_experts", cfg.get("num_local_experts")), moe_topk=cfg["num_experts_per_tok"],
                moe_pre_softmax=not cfg.get("norm_topk_prob", False), ffn_hidden_size=cfg["moe_intermediate_size"],
                shared_expert_size=shared or None, shared_expert_gate=bool(shared))


def _llama_config(cfg: dict, kind: str = "llama") -> ModelConfig:
    """LLaMA-style config.json (``kind``: llama, qwen2, qwen3, mistral, mixtral, qwen2_moe, qwen3_moe) -> ModelConfig."""
    attn = _ATTENTION[kind]
    if cfg.get("hidden_act", "silu") != "silu":
        raise _unsupported(f"hidden_act {cfg['hidden_act']!r}", "LLaMA-style MLPs must use silu (SwiGLU)")
    if attn in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise _unsupported("use_sliding_window=true", f"{kind}'s per-layer sliding window (max_window_layers) is "
                           "not implemented; set it false (the released models do)")
    window = cfg.get("sliding_window") if attn == "mistral" else None
    base, partial, scaling = _rope(cfg)
    heads = cfg["num_attention_heads"]
    attn_bias = bool(cfg.get("attention_bias", False))
    fields = dict(ffn_hidden_size=cfg["intermediate_size"]) if kind not in _MOE else _moe_config(cfg, kind)
    return ModelConfig(
        family="llama", num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        num_attention_heads=heads, num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"], position_embedding="rope", rotary_base=base,
        rotary_percent=partial, rope_scaling=scaling, normalization="RMSNorm", norm_epsilon=cfg["rms_norm_eps"],
        activation="swiglu", tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias={"qwen2": True, "mistral": False}.get(attn, attn_bias),
        proj_bias={"qwen2": False, "mistral": False}.get(attn, attn_bias),
        mlp_bias=bool(cfg.get("mlp_bias", False)) if kind == "llama" else False,
        init_method_std=float(cfg.get("initializer_range", 0.02)), qk_layernorm=attn == "qwen3",
        sliding_window=int(window) if window is not None else None, **fields)


def _moe_to_hf(mc: ModelConfig, base: dict, kind: str) -> dict:
    if not mc.is_moe:
        raise ConversionError(f"{kind} is a mixture-of-experts architecture and this model has a dense MLP: export "
                              "it as llama, qwen2, qwen3 or mistral")
    shared = mc.shared_expert_size is not None
    if shared != (kind == "qwen2_moe") or (shared and not mc.shared_expert_gate):
        raise ConversionError(f"{kind} {'has no' if shared else 'needs a gated'} shared expert: export this model as "
                              f"{'qwen2_moe' if shared else 'mixtral or qwen3_moe'}")
    if kind == "mixtral":
        if mc.moe_pre_softmax:
            raise ConversionError("Mixtral renormalises its top-k weights and this model does not: export it as "
                                  "qwen3_moe (norm_topk_prob false)")
        return {"num_local_experts": mc.num_experts, "num_experts_per_tok": mc.moe_topk,
                "intermediate_size": mc.ffn_hidden_size}
    out = {"num_experts": mc.num_experts, "num_experts_per_tok": mc.moe_topk, "norm_topk_prob": not mc.moe_pre_softmax,
           "moe_intermediate_size": mc.ffn_hidden_size, "decoder_sparse_step": 1, "mlp_only_layers": [],
           "intermediate_size": base.get("intermediate_size", mc.ffn_hidden_size)}  # (dense layers': none here)
    if kind == "qwen3_moe":
        out["num_local_experts"] = mc.num_experts  # transformers 5's name for num_experts
    else:
        out["shared_expert_intermediate_size"] = mc.shared_expert_size
    return out


def _llama_to_hf(mc: ModelConfig, base: dict, kind: str = "llama") -> dict:
    attn = _ATTENTION[kind]
    out = {
        "hidden_size": mc.hidden_size, "intermediate_size": mc.ffn_hidden_size, "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_attention_heads, "num_key_value_heads": mc.num_query_groups,
        "head_dim": mc.kv_channels, "vocab_size": mc.vocab_size, "max_position_embeddings": mc.max_position_embeddings,
        "rms_norm_eps": mc.norm_epsilon, "hidden_act": "silu", "tie_word_embeddings": mc.tie_word_embeddings,
        "initializer_range": mc.init_method_std, **_rope_to_hf(mc),
    }
    if kind in _MOE:
        out.update(_moe_to_hf(mc, base, kind))
    elif mc.is_moe:
        raise ConversionError(f"this model has {mc.num_experts} experts per layer and {kind} none: export it as "
                              "mixtral, qwen2_moe or qwen3_moe")
    if mc.qk_layernorm != (attn == "qwen3"):
        raise ConversionError(f"{kind} {'has no' if mc.qk_layernorm else 'needs'} QK-norm: export this model as "
                              f"{'qwen3' if mc.qk_layernorm else 'llama'} instead")
    if mc.sliding_window is not None and attn != "mistral":
        raise ConversionError(f"this model has a sliding window ({mc.sliding_window}) and {kind} has none: export "
                              "it as mistral")
    if attn == "qwen2":
        if not mc.qkv_bias or mc.proj_bias or mc.mlp_bias:
            raise ConversionError(f"{kind} has q/k/v biases only: export this model as llama instead")
    elif attn == "mistral":
        if mc.qkv_bias or mc.proj_bias or mc.mlp_bias:
            raise ConversionError(f"{kind} has no biases: export this model as llama or qwen2 instead")
        out["sliding_window"] = mc.sliding_window
    elif attn == "qwen3":
        if mc.qkv_bias != mc.proj_bias or mc.mlp_bias:
            raise ConversionError(f"{kind}'s attention_bias needs q/k/v and o biases together and no MLP bias")
        out.update(attention_bias=mc.qkv_bias)
    else:
        if mc.qkv_bias != mc.proj_bias:
            raise ConversionError("LlamaConfig.attention_bias needs q/k/v and o biases together: export as qwen2")
        out.update(attention_bias=mc.qkv_bias, mlp_bias=mc.mlp_bias)
    return out


def _nemotron_config(cfg: dict) -> ModelConfig:
    if cfg.get("hidden_act", "relu2") != "relu2":
        raise _unsupported(f"hidden_act {cfg['hidden_act']!r}", "Nemotron MLPs must use relu2")
    base, partial, scaling = _rope(cfg)
    heads = cfg["num_attention_heads"]
    return ModelConfig(
        family="nemotron", num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"], position_embedding="rope", rotary_base=base,
        rotary_percent=partial, rope_scaling=scaling, normalization="LayerNorm", norm_epsilon=cfg["norm_eps"],
        activation="squared_relu", tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", False)), proj_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)), init_method_std=float(cfg.get("initializer_range", 0.02)))


def _nemotron_to_hf(mc: ModelConfig, base: dict) -> dict:
    if mc.qkv_bias != mc.proj_bias:
        raise ConversionError("NemotronConfig.attention_bias needs q/k/v and o biases together")
    return {
        "hidden_size": mc.hidden_size, "intermediate_size": mc.ffn_hidden_size, "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_attention_heads, "num_key_value_heads": mc.num_query_groups,
        "head_dim": mc.kv_channels, "vocab_size": mc.vocab_size, "max_position_embeddings": mc.max_position_embeddings,
        "norm_eps": mc.norm_epsilon, "hidden_act": "relu2", "tie_word_embeddings": mc.tie_word_embeddings,
        "attention_bias": mc.qkv_bias, "mlp_bias": mc.mlp_bias, "initializer_range": mc.init_method_std,
        **_rope_to_hf(mc),
    }


_GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _gpt2_config(cfg: dict) -> ModelConfig:
    act = cfg.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTS:
        raise _unsupported(f"activation_function {act!r}", f"use one of {sorted(_GPT2_ACTS)}")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag):
            raise _unsupported(f"{flag}=true", "not implemented in megatron-core")
    if cfg.get("scale_attn_weights") is False:
        raise _unsupported("scale_attn_weights=false", "not implemented in megatron-core")
    h = cfg["n_embd"]
    return ModelConfig(
        family="gpt", num_layers=cfg["n_layer"], hidden_size=h, ffn_hidden_size=cfg.get("n_inner") or 4 * h,
        num_attention_heads=cfg["n_head"], vocab_size=cfg["vocab_size"], max_position_embeddings=cfg["n_positions"],
        position_embedding="learned_absolute", normalization="LayerNorm", norm_epsilon=cfg["layer_norm_epsilon"],
        activation=_GPT2_ACTS[act], tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), qkv_bias=True,
        proj_bias=True, mlp_bias=True,
        init_method_std=float(cfg.get("initializer_range", 0.02)))


def _gpt2_to_hf(mc: ModelConfig, base: dict) -> dict:
    acts = {"gelu_tanh": base.get("activation_function", "gelu_new"), "gelu": "gelu"}
    return {"n_embd": mc.hidden_size, "n_layer": mc.num_layers, "n_head": mc.num_attention_heads,
            "n_inner": mc.ffn_hidden_size, "vocab_size": mc.vocab_size, "n_positions": mc.max_position_embeddings,
            "layer_norm_epsilon": mc.norm_epsilon, "activation_function": acts[mc.activation],
            "initializer_range": mc.init_method_std, "tie_word_embeddings": mc.tie_word_embeddings}


@dataclass(frozen=True)
class Architecture:
    """One Hugging Face architecture: its config and tensor mapping to megatron-core."""

    model_type: str
    hf_class: str
    family: str
    from_hf_config: Callable[[dict], ModelConfig]
    to_hf_config: Callable[[ModelConfig, dict], dict]  # (config, original HF config or {}) -> HF fields
    rules: Callable[[ModelConfig], list[TensorRule]]
    hf_prefix: str = ""  # optional leading component of HF names that some checkpoints omit


ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("llama", "LlamaForCausalLM", "llama", _llama_config, _llama_to_hf, _llama_like_rules),
    *(Architecture(kind, cls, "llama", functools.partial(_llama_config, kind=kind),
                   functools.partial(_llama_to_hf, kind=kind),
                   _llama_like_rules)
      for kind, cls in (("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"), ("mistral", "MistralForCausalLM"))),
    Architecture("mixtral", "MixtralForCausalLM", "llama", functools.partial(_llama_config, kind="mixtral"),
                 functools.partial(_llama_to_hf, kind="mixtral"), lambda mc: _llama_like_rules(mc, moe=MIXTRAL_NAMES)),
    *(Architecture(kind, cls, "llama", functools.partial(_llama_config, kind=kind),
                   functools.partial(_llama_to_hf, kind=kind), _llama_like_rules)
      for kind, cls in (("qwen2_moe", "Qwen2MoeForCausalLM"), ("qwen3_moe", "Qwen3MoeForCausalLM"))),
    Architecture("gpt2", "GPT2LMHeadModel", "gpt", _gpt2_config, _gpt2_to_hf, _gpt2_rules, "transformer."),
    Architecture("nemotron", "NemotronForCausalLM", "nemotron", _nemotron_config, _nemotron_to_hf,
                 lambda mc: _llama_like_rules(mc, plus_one=True)),
)}
DEFAULT_FOR_FAMILY = {"llama": "llama", "gpt": "gpt2", "nemotron": "nemotron"}


def default_model_type(mc: ModelConfig) -> str:
    """The HF model type a model is exported as when its original config.json is not known."""
    if mc.family == "llama" and mc.is_moe:
        return "qwen2_moe" if mc.shared_expert_size else "qwen3_moe" if mc.qk_layernorm or mc.moe_pre_softmax \
            else "mixtral"
    if mc.family == "llama":
        if mc.qk_layernorm:
            return "qwen3"
        if mc.sliding_window is not None:
            return "mistral"
    return DEFAULT_FOR_FAMILY[mc.family]


def model_type_of(mc: ModelConfig, hf_config: dict | None) -> str:
    """The HF model type of a converted model: its original config's, else ``default_model_type``."""
    return (hf_config or {}).get("model_type") or default_model_type(mc)


# Architectures users ask for that are known not to map (yet), and why.
UNSUPPORTED = {
    "deepseek_v2": "multi-head latent attention (MLA) and group-limited routing are not mapped",
    "deepseek_v3": "multi-head latent attention (MLA), sigmoid routing with expert bias and dense first layers are "
                   "not mapped",
    "qwen3_next": "its hybrid linear attention (Gated DeltaNet) has no megatron-core local layer",
    "gpt_oss": "attention sinks and its clamped SwiGLU experts are not mapped",
}


def architecture_for(hf_config: dict) -> Architecture:
    """The ``Architecture`` of a ``config.json`` dict, or a ConversionError naming the supported ones."""
    model_type = hf_config.get("model_type")
    if model_type in UNSUPPORTED:
        raise _unsupported(f"model_type {model_type!r}", f"{UNSUPPORTED[model_type]}; supported model types are "
                           f"{', '.join(sorted(ARCHITECTURES))}")
    if model_type not in ARCHITECTURES:
        archs = hf_config.get("architectures") or ["?"]
        raise ConversionError(
            f"unknown architecture {archs[0]} (model_type {model_type!r}): supported model types are "
            f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def model_config_from_hf(hf_config: dict) -> ModelConfig:
    """``ModelConfig`` of a ``config.json`` dict; invalid values become ConversionErrors."""
    arch = architecture_for(hf_config)
    try:
        return arch.from_hf_config(hf_config)
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r} needed for {arch.model_type}: fix config.json") from None
    except ModelConfigError as e:
        raise ConversionError(f"invalid config.json: {e}") from None


def hf_config_from_model_config(mc: ModelConfig, original: dict | None, dtype: str) -> dict:
    """A ``config.json`` dict for ``mc``: the original HF config (token ids etc.) with the architecture
    fields rewritten from ``mc``."""
    original = dict(original or {})
    arch = ARCHITECTURES[model_type_of(mc, original)]
    out = {k: v for k, v in original.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    out.update(arch.to_hf_config(mc, original))
    out.update(model_type=arch.model_type, architectures=[arch.hf_class],
               dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype])
    return out
