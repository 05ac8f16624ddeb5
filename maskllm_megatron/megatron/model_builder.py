"""Typed model description and megatron-core GPTModel construction (local spec, no TE/Apex).

``ModelConfig`` describes a decoder-only transformer in architecture terms (what a Hugging Face
config says); ``to_transformer_config`` turns it into megatron-core's ``TransformerConfig`` for a
given parallel layout, and ``build_gpt_model`` builds megatron-core's own ``GPTModel`` with
``get_gpt_layer_local_spec``. Three families are covered:

- ``gpt``: GPT-2/GPT-3 style: learned absolute positions, LayerNorm, GeLU (tanh), biases, tied head.
- ``llama``: LLaMA-2/3 style (also Qwen2, Qwen3, Mistral, SmolLM2): RoPE (optionally LLaMA-3 scaled),
  RMSNorm, SwiGLU, grouped-query attention, tied or untied head, optional attention biases, optional
  QK-norm (Qwen3: megatron's ``qk_layernorm``) and causal sliding window (Mistral: ``window_size``).
- mixture of experts (``num_experts``; Mixtral, Qwen2-MoE, Qwen3-MoE): every layer's MLP is megatron-core's
  ``MoELayer`` from the local spec: a top-k router, ``SequentialMLP`` experts (each a SwiGLU MLP whose
  linears are Column/RowParallelLinear, so they can be masked), optionally a gated shared expert.
  Expert parallel (EP) ranks hold ``num_experts / EP`` experts each; ``global_expert_name`` turns a
  rank's local expert index into the global one.
- ``nemotron``: Nemotron-4 style: squared-ReLU MLP without gate, LayerNorm1p, partial RoPE.
  megatron-core's torch norm wrapper refuses ``layernorm_zero_centered_gamma``; since
  ``norm(x) * (1 + w) + b`` equals a plain LayerNorm with weight ``w + 1``, the converter stores
  ``w + 1`` in the megatron-core checkpoint and subtracts 1 again on export (see ``convert``).

Megatron's bias switches are coarser than the architectures': ``add_bias_linear`` adds biases to
the attention output and both MLP linears at once (and to QKV). When an architecture has some of
those biases but not all (LLaMA with ``attention_bias=True`` has q/k/v/o biases but no MLP bias),
the missing ones exist in the megatron-core model and are held at zero by the converter.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

Family = Literal["llama", "gpt", "nemotron"]
Activation = Literal["swiglu", "gelu", "gelu_tanh", "squared_relu"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelConfigError(ValueError):
    """An invalid model description or parallel layout (message says what and how to fix it)."""


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GeLU with the tanh approximation (GPT-2's ``gelu_new``)."""
    return F.gelu(x, approximate="tanh")


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 (Nemotron's ``relu2``)."""
    return torch.pow(F.relu(x), 2)


_ACTIVATIONS = {"swiglu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "squared_relu": squared_relu}


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3 ("llama3") RoPE frequency scaling."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer, independent of how it is parallelised.

    ``vocab_size`` is the tokenizer's vocabulary; embeddings and the output layer are padded with
    zero rows to ``padded_vocab_size`` so that every tensor-parallel size dividing it works.
    """

    family: Family
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    num_query_groups: int | None = None  # None: multi-head attention (one group per head)
    kv_channels: int | None = None  # head dimension; None: hidden_size // num_attention_heads
    padded_vocab_size: int | None = None  # None: vocab_size rounded up to make_vocab_size_divisible_by
    make_vocab_size_divisible_by: int = 128
    position_embedding: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rope_scaling: RopeScaling | None = None
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: Activation = "swiglu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    proj_bias: bool = False
    mlp_bias: bool = False
    init_method_std: float = 0.02
    qk_layernorm: bool = False  # Qwen3: a norm over each head's queries and keys before RoPE
    sliding_window: int | None = None  # Mistral: each token attends to itself and the window - 1 before it
    # Mixture of experts (every layer's MLP; ffn_hidden_size is then each expert's intermediate size)
    num_experts: int | None = None  # routed experts per layer; None: a dense MLP
    moe_topk: int = 2  # experts per token
    # True: weights = softmax over all experts, taken at the top k (not renormalised; Qwen2-MoE, Qwen3-MoE
    # with norm_topk_prob false); False: softmax over the top-k logits (renormalised; Mixtral, norm_topk_prob)
    moe_pre_softmax: bool = False
    shared_expert_size: int | None = None  # intermediate size of a shared expert every token passes (Qwen2-MoE)
    shared_expert_gate: bool = False  # the shared expert's output scaled by sigmoid(x . g) per token

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            object.__setattr__(self, "num_query_groups", self.num_attention_heads)
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ModelConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}: set kv_channels (head_dim) explicitly")
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.padded_vocab_size is None:
            m = self.make_vocab_size_divisible_by
            object.__setattr__(self, "padded_vocab_size", -(-self.vocab_size // m) * m)
        self.validate()

    # ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ModelConfigError`` naming the first inconsistent field."""
        if self.family not in ("llama", "gpt", "nemotron"):
            raise ModelConfigError(f"unknown model family {self.family!r}: use llama, gpt or nemotron")
        if self.activation not in _ACTIVATIONS:
            raise ModelConfigError(f"unknown activation {self.activation!r}: use one of {sorted(_ACTIVATIONS)}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings", "num_query_groups", "kv_channels"):
            if int(getattr(self, name)) <= 0:
                raise ModelConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ModelConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_query_groups "
                f"{self.num_query_groups}: fix num_key_value_heads in the model config")
        if self.padded_vocab_size < self.vocab_size:
            raise ModelConfigError(
                f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ModelConfigError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        if self.position_embedding not in ("rope", "learned_absolute"):
            raise ModelConfigError(f"unknown position_embedding {self.position_embedding!r}")
        if self.rope_scaling is not None and self.position_embedding != "rope":
            raise ModelConfigError("rope_scaling is set but position_embedding is not 'rope'")
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ModelConfigError(f"unknown normalization {self.normalization!r}: use RMSNorm or LayerNorm")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ModelConfigError(f"sliding_window must be >= 1 or None (full attention), got {self.sliding_window}")
        if self.num_experts is None:
            if self.shared_expert_size is not None or self.shared_expert_gate:
                raise ModelConfigError("shared_expert_size / shared_expert_gate need num_experts (a MoE model)")
        else:
            if self.num_experts < 1 or not 1 <= self.moe_topk <= self.num_experts:
                raise ModelConfigError(f"num_experts {self.num_experts} and moe_topk {self.moe_topk}: need "
                                       "1 <= moe_topk <= num_experts")
            if self.add_bias_linear:
                raise ModelConfigError("a mixture-of-experts model with linear (o_proj / MLP) biases is not "
                                       "supported (megatron-core keeps expert biases only without expert TP)")
            if self.shared_expert_gate and self.shared_expert_size is None:
                raise ModelConfigError("shared_expert_gate needs shared_expert_size")
            if self.shared_expert_size is not None and self.shared_expert_size < 1:
                raise ModelConfigError(f"shared_expert_size must be >= 1, got {self.shared_expert_size}")

    def validate_parallel(self, tp: int, pp: int = 1, ep: int = 1) -> None:
        """Check that ``tp`` x ``pp`` (x ``ep`` expert-parallel) can shard this model; raise naming the fix if not."""
        if tp < 1 or pp < 1 or ep < 1:
            raise ModelConfigError(f"tensor/pipeline/expert parallel sizes must be >= 1, got tp={tp} pp={pp} ep={ep}")
        if ep > 1 and self.num_experts is None:
            raise ModelConfigError(f"expert-parallel size {ep} for a model without experts: use ep=1")
        if self.num_experts is not None and self.num_experts % ep:
            raise ModelConfigError(f"expert-parallel size {ep} does not divide num_experts={self.num_experts}: use a "
                                   f"divisor of {self.num_experts}")
        for name in self._tp_sharded():
            value = getattr(self, name)
            if value % tp:
                raise ModelConfigError(f"tensor-parallel size {tp} does not divide {name}={value}: this model "
                                       f"shards at tensor-parallel sizes {self.tensor_parallel_sizes()}")
        if self.num_layers % pp:
            raise ModelConfigError(f"pipeline-parallel size {pp} does not divide num_layers={self.num_layers}: "
                                   f"use a divisor of {self.num_layers}")

    TP_SHARDED = ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "padded_vocab_size")

    def _tp_sharded(self) -> tuple[str, ...]:
        return self.TP_SHARDED + (("shared_expert_size",) if self.shared_expert_size is not None else ())

    def tensor_parallel_sizes(self, limit: int = 64) -> list[int]:
        """The tensor-parallel sizes up to ``limit`` that divide every sharded dimension."""
        return [d for d in range(1, limit + 1) if all(getattr(self, n) % d == 0 for n in self._tp_sharded())]

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def gated(self) -> bool:
        """Whether the MLP's first linear holds [gate; up] (SwiGLU)."""
        return self.activation == "swiglu"

    @property
    def add_bias_linear(self) -> bool:
        """megatron-core's ``add_bias_linear``: on when the architecture has proj or MLP biases."""
        return self.proj_bias or self.mlp_bias

    def num_parameters(self) -> int:
        """Parameter count of the unpadded architecture (tied head counted once)."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        q, kv = self.num_attention_heads * self.kv_channels, self.num_query_groups * self.kv_channels
        norm = h * (2 if self.normalization == "LayerNorm" else 1)
        mlp = h * f * (2 if self.gated else 1) + f * h
        if self.is_moe:  # router, experts, the shared expert and its gate
            shared = self.shared_expert_size or 0
            mlp = self.num_experts * (h + mlp) + shared * h * (2 if self.gated else 1) + shared * h
            mlp += h * self.shared_expert_gate
        layer = h * (q + 2 * kv) + q * h + mlp + 2 * norm
        layer += (q + 2 * kv) * self.qkv_bias + h * self.proj_bias + (f * (2 if self.gated else 1) + h) * self.mlp_bias
        layer += 2 * self.kv_channels * self.qk_layernorm
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        pos = self.max_position_embeddings * h if self.position_embedding == "learned_absolute" else 0
        return L * layer + emb + pos + norm

    # ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelConfigError(f"unknown ModelConfig fields {unknown}: the file was written by another version")
        return cls(**d)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ----------------------------------------------------------------------------------------
    def to_transformer_config(self, tp: int = 1, pp: int = 1, dtype: str | torch.dtype = "fp32",
                              ep: int = 1, **overrides: Any):
        """megatron-core ``TransformerConfig`` for this model at tensor/pipeline/expert parallel ``tp``/``pp``/``ep``.

        Dropouts are 0 and fusions off (CPU friendly, deterministic); ``overrides`` are passed on. MoE: the
        router's linear, softmax and top-k run in fp32 (``moe_router_dtype``), no auxiliary loss (the router
        is frozen during mask learning), no token dropping, experts' TP = TP.
        """
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.validate_parallel(tp, pp, ep)
        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        kwargs: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=self.gated,
            activation_func=_ACTIVATIONS[self.activation],
            add_bias_linear=self.add_bias_linear,
            add_qkv_bias=self.qkv_bias,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            attention_softmax_in_fp32=True,
            init_method_std=self.init_method_std,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            sequence_parallel=False,
            params_dtype=torch_dtype,
            pipeline_dtype=torch_dtype,
            bf16=torch_dtype == torch.bfloat16,
            fp16=torch_dtype == torch.float16,
            use_cpu_initialization=not torch.cuda.is_available(),
            qk_layernorm=self.qk_layernorm,
            # megatron's window (left, right): the token itself and sliding_window - 1 before it (HF's window)
            window_size=(self.sliding_window - 1, 0) if self.sliding_window is not None else None,
        )
        if self.is_moe:
            kwargs.update(
                num_moe_experts=self.num_experts, moe_ffn_hidden_size=self.ffn_hidden_size,
                moe_router_topk=self.moe_topk, moe_router_pre_softmax=self.moe_pre_softmax,
                moe_shared_expert_intermediate_size=self.shared_expert_size,
                moe_shared_expert_gate=self.shared_expert_gate, moe_router_dtype="fp32",
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, expert_model_parallel_size=ep)
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)


def _router_without_transformer_engine() -> None:
    """megatron-core 0.16.1's router linear (``moe_utils.RouterGatingLinearFunction``) tests
    ``te_general_gemm is not None``, a name only defined when Transformer Engine imports: without TE (every
    CPU run, a GPU without TE) the first MoE forward raises NameError. Defining it as None takes the
    torch.mm path the code has for that case."""
    from megatron.core.transformer.moe import moe_utils

    if not getattr(moe_utils, "HAVE_TE", True) and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_gpt_model(model_config: ModelConfig, transformer_config=None, *, tp: int | None = None,
                    pp: int | None = None, dtype: str | torch.dtype = "fp32", pre_process: bool | None = None,
                    post_process: bool | None = None, parallel_output: bool = True, vp_stage: int | None = None,
                    attention: str = "sdpa"):
    """megatron-core ``GPTModel`` (local spec) for ``model_config`` on this rank's pipeline stage.

    ``parallel_state`` must be initialised. ``tp``/``pp`` default to the initialised sizes;
    ``pre_process``/``post_process`` default to whether this rank is the first/last stage.
    Pass ``transformer_config`` to reuse one (e.g. with ``perform_initialization=False``).
    With ``parallel_output=False`` the logits are gathered over tensor-parallel ranks.
    ``attention``: ``"sdpa"`` (fused ``scaled_dot_product_attention``, see ``attention.py``) or
    ``"local"`` (megatron-core's unfused ``DotProductAttention``); same parameters and results.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    tp = parallel_state.get_tensor_model_parallel_world_size() if tp is None else tp
    pp = parallel_state.get_pipeline_model_parallel_world_size() if pp is None else pp
    if transformer_config is None:
        transformer_config = model_config.to_transformer_config(
            tp, pp, dtype, ep=parallel_state.get_expert_model_parallel_world_size())
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if model_config.is_moe:
        _router_without_transformer_engine()
    spec = get_gpt_layer_local_spec(num_experts=model_config.num_experts, moe_grouped_gemm=False,
                                    qk_layernorm=model_config.qk_layernorm, normalization=model_config.normalization)
    if attention == "sdpa":
        from .attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    elif attention != "local":
        raise ValueError(f"attention must be 'sdpa' or 'local', got {attention!r}")
    spec = _block_spec(spec, transformer_config, vp_stage)
    scaling = model_config.rope_scaling
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        vocab_size=model_config.padded_vocab_size,
        max_sequence_length=model_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=model_config.tie_word_embeddings,
        position_embedding_type=model_config.position_embedding,
        rotary_percent=model_config.rotary_percent,
        rotary_base=model_config.rotary_base,
        vp_stage=vp_stage,
    )
    if transformer_config.recompute_granularity == "full" and pre_process:
        model.embedding.register_forward_hook(_block_input_requires_grad)
    if scaling is not None:
        # GPTModel only exposes the scaling factor; apply all four LLaMA-3 parameters here.
        rope = model.rotary_pos_emb
        dim = int(model_config.kv_channels * model_config.rotary_percent)
        base = 1.0 / (model_config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        rope.inv_freq = rope._apply_scaling(
            base.to(rope.inv_freq.device), factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings)
    _mark_tensor_parallel_weights(model)
    return model


def _mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """megatron marks a parallel layer's weight as split over the tensor-parallel ranks only when it
    initialises it. Built with ``perform_initialization=False`` (weights loaded from a checkpoint, as the
    driver does) they stay unmarked, and megatron's gradient norm counts an unmarked parameter as a copy,
    once, from TP rank 0: weights that train (joint training, a refit) then had a smaller norm at TP=2 than
    at TP=1 (0.63 against 0.88 on the tiny test model), and clipping differed. Mark them as initialisation
    would: column-parallel weights and embeddings on dim 0, row-parallel weights on dim 1."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)


def _block_input_requires_grad(_module, _args, output):
    """Forward hook on the embedding under full recompute. megatron checkpoints whole layers with a
    re-entrant autograd function, whose output needs a gradient only when one of its tensor inputs does;
    parameters inside the layers do not count. With frozen embeddings (mask learning) the first layer's
    input needs none, so the checkpointed layers would get no gradient at all (seen: a zero gradient
    norm). The embedding's output is made a leaf that requires one."""
    if torch.is_grad_enabled() and not output.requires_grad:
        return output.detach().requires_grad_()
    return output


def _block_spec(layer_spec, transformer_config, vp_stage):
    """The decoder block of ``layer_spec`` with our norm (``norm.TorchNorm``, which accepts sequence
    parallelism) in every layer and as the final norm; megatron would build the final norm itself
    with ``WrappedTorchNorm``, which refuses it."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (TransformerBlock, TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    from .norm import TorchNorm

    layer_spec.submodules.input_layernorm = TorchNorm
    layer_spec.submodules.pre_mlp_layernorm = TorchNorm
    layers = get_num_layers_to_build(transformer_config, vp_stage)
    return ModuleSpec(module=TransformerBlock, submodules=TransformerBlockSubmodules(
        layer_specs=[layer_spec] * layers, layer_norm=TorchNorm))


_LOCAL_EXPERT = re.compile(r"(experts\.local_experts\.)(\d+)(?=\.|$)")


def expert_offset(model) -> int:
    """The global index of this rank's first expert: expert-parallel rank r holds experts r * E / EP, ...
    (0 for a dense model)."""
    from megatron.core import parallel_state

    experts = getattr(getattr(model, "config", None), "num_moe_experts", None)
    if not experts:
        return 0
    return parallel_state.get_expert_model_parallel_rank() * (experts // parallel_state.get_expert_model_parallel_world_size())


def global_expert_name(name: str, offset: int) -> str:
    """``...experts.local_experts.<local>...`` with the GLOBAL expert index (``offset`` + local)."""
    return _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}", name) if offset else name


def global_module_names(model) -> tuple[dict[str, str], dict[str, str]]:
    """Two maps from every module's (rank-local) name, with pipeline-local layer indices replaced by global
    layer numbers (megatron's 1-based ``layer_number``) and expert-parallel-local expert indices by global
    ones: the full name (``decoder.layers.<global>.mlp.linear_fc1``) and the name from the transformer
    layer on (``layers.<global>.mlp.linear_fc1``; outside a layer, the full name). Checkpoint tensors and
    include/exclude patterns use the first, the random streams the second: both are the same on every
    pipeline stage and expert-parallel rank."""
    experts = expert_offset(model)
    layer_numbers = {name: module.layer_number - 1 for name, module in model.named_modules()
                     if hasattr(module, "layer_number") and re.search(r"layers\.\d+$", name)}
    full, relative = {}, {}
    for name, _ in model.named_modules():
        m = re.match(r"((.*?)layers\.\d+)(\..*)?$", name)
        if m and m.group(1) in layer_numbers:
            rest = global_expert_name(m.group(3) or "", experts)
            relative[name] = f"layers.{layer_numbers[m.group(1)]}{rest}"
            full[name] = f"{m.group(2)}{relative[name]}"
        else:
            full[name] = relative[name] = name
    return full, relative


def is_expert_name(name: str) -> bool:
    """Whether a module / parameter name is inside a routed expert (sharded over expert-parallel ranks and
    expert-tensor-parallel ranks)."""
    return ".experts.local_experts." in name


def gpt_forward(model, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Run a single-stage ``GPTModel`` on ``tokens`` [b, s] with positions 0..s-1, causal attention
    (no mask tensor: the layers' causal mask type applies, so SDPA takes its causal kernels).

    Returns logits [b, s, v] (vocab-parallel shard unless built with ``parallel_output=False``),
    or per-token losses [b, s] when ``labels`` are given.
    """
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    return model(tokens, position_ids, None, labels=labels)
