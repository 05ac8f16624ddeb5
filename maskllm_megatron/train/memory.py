"""Per-GPU memory of mask learning: a model of what the driver allocates, checked against measured peaks.

``estimate(model, layout)`` gives, for the most loaded pipeline stage, the bytes of: the frozen weights,
the mask logits (C(M,N)/M per masked weight, in the model's dtype), the prior masks (one byte per masked
weight), the gradient buffers (fp32: the driver reduces in fp32), the optimizer state (Adam's two fp32
moments and, for a bf16 model, the fp32 master copy; split over data-parallel ranks by the distributed
optimizer), the teacher's copy of the weights that train when a run distils while they train (joint
training or a refit; ``MaskController.keep_teacher_copy``), and the activations of a training step at its peak.
Pure arithmetic: it is used by the driver's start-up line, ``benchmarks/memory_model.py`` (the check
against measured peaks) and the README.

Activations (``s`` sequence, ``b`` micro-batch, ``t`` TP, ``e`` bytes per element; ``sp = t`` under
sequence parallelism, else 1), per layer and micro-batch, as the tensors autograd keeps for the local
spec with SDPA (flash kernels: no ``s x s`` term; listed by tracing the saved tensors):
  - norms: input and output of both norms, ``4 s b h e / sp``, plus their fp32 statistics; the first
    layer's input norm keeps nothing when the embeddings are frozen (its input needs no gradient);
  - attention: the fused QKV output (``(q + 2 kv) / t``, alive through the value view), the rotated
    query and key (``(q + kv) / t``), the attention output (``q / t``, shared with ``linear_proj``'s
    input), the fp32 log-sum-exp (``heads / t`` per token) and the RoPE tables (``4 s d_rot e``);
  - MLP: SwiGLU keeps ``linear_fc1``'s output (``2 f / t``), silu's output, the up half plus offset and
    the product (``3 f / t``); a plain activation (GeLU, squared ReLU) ``2 f / t``;
  - mask sampling: every masked linear keeps its sampled ``W * mask`` (``e`` per weight) and the fp32
    pattern probabilities (``4 C / M`` per weight; plus a fp32 hard mask with ``mask.hard``) until its
    backward: memory that grows with the weights, not the tokens, once per micro-batch in flight.
Full recompute keeps only each recomputed chunk's input (``s b h e / sp``) and rebuilds one chunk
(its activations and its layers' mask sampling) at a time in the backward. Selective recompute drops
what its modules keep (``core_attn``: the log-sum-exp, as the attention output is ``linear_proj``'s
input anyway; ``mlp``: the MLP's activations and its two layers' mask sampling). The 1F1B pipeline
schedule has ``min(pp - stage, micro-batches)`` micro-batches in flight on a stage, and keeps the output
(``s b h e / sp``) of each for its backward. The last stage adds the final norm and the loss: the fp32
softmax over the vocabulary shard (``4 s b V / t``, plus the logits' own copy when they are not fp32),
and the final norm's output and the hidden state's gradient.
The last layer's backward starts with what recompute rebuilt of it, plus the gradients of
``linear_fc2``'s input and sampled weight, then of the activation's inputs. The peak is the larger of
the two moments (``transient``). Not modelled: distillation (the teacher's logits), communication
buffers, the framework's own allocations.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import comb

GB = 1e9
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEFAULT_MASKED = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@dataclass(frozen=True)
class Layout:
    """How a run lays a model out, and what it trains (the driver's config in memory terms)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"  # none | full | selective
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    recompute_modules: tuple[str, ...] = ("core_attn",)
    micro_batch_size: int = 1
    seq_length: int = 4096
    num_microbatches: int = 1  # per data-parallel rank and iteration
    dtype: str = "bf16"
    distributed_optimizer: bool = True
    train_weights: bool = False  # joint training: the masked weights, their biases and the norms train too
    refit: bool = False  # the masked weights train under fixed masks; the logits do not
    teacher_copy: bool = False  # distillation while weights train: a copy of the trained weights (the teacher)
    prior: bool = True  # a prior mask (one byte per masked weight) is kept
    n: int = 2
    m: int = 4
    hard: bool = False
    masked: tuple[str, ...] = DEFAULT_MASKED

    @classmethod
    def from_config(cls, cfg, world_size: int, dtype: str) -> "Layout":
        """The layout of a driver config (``run_config.TrainConfig``) on ``world_size`` ranks."""
        p, d = cfg.parallel, cfg.data
        dp = world_size // (p.tp * p.pp)
        nm = cfg.mask_config().nm
        return cls(tp=p.tp, pp=p.pp, dp=dp, sequence_parallel=p.sequence_parallel, recompute=p.recompute,
                   recompute_method=p.recompute_method, recompute_num_layers=p.recompute_num_layers,
                   recompute_modules=tuple(p.recompute_modules), micro_batch_size=d.micro_batch_size,
                   seq_length=d.seq_length, num_microbatches=d.global_batch_size // (d.micro_batch_size * dp),
                   dtype=dtype, distributed_optimizer=p.distributed_optimizer, train_weights=cfg.mask.train_weights,
                   refit=cfg.mask.refit, teacher_copy=cfg.distills_trained_weights(),
                   prior=cfg.prior.method != "none", n=nm.n, m=nm.m, hard=cfg.mask.hard,
                   masked=masked_linears(cfg.mask.include, cfg.mask.exclude))


def masked_linears(include, exclude=()) -> tuple[str, ...]:
    """Which of a block's four linears the include/exclude patterns mask (as in every block)."""
    import fnmatch

    paths = {"linear_qkv": "decoder.layers.0.self_attention.linear_qkv",
             "linear_proj": "decoder.layers.0.self_attention.linear_proj",
             "linear_fc1": "decoder.layers.0.mlp.linear_fc1", "linear_fc2": "decoder.layers.0.mlp.linear_fc2"}
    return tuple(k for k, path in paths.items() if any(fnmatch.fnmatchcase(path, p) for p in include)
                 and not any(fnmatch.fnmatchcase(path, p) for p in exclude))


@dataclass
class Estimate:
    """Bytes per GPU on the most loaded pipeline stage (``stage``)."""

    stage: int
    weights: float
    mask_logits: float
    prior_masks: float
    gradients: float
    optimizer: float
    activations: float  # saved for the backward, all micro-batches in flight
    mask_sampling: float  # of which: the sampled masked weights and probabilities
    transient: float  # on top at the peak: the loss, or the first backward (with a rebuilt chunk)
    teacher: float = 0.0  # the teacher's copy of the trained weights (distillation while weights train)
    detail: dict = field(default_factory=dict)

    @property
    def state(self) -> float:
        """What persists between steps."""
        return self.weights + self.mask_logits + self.prior_masks + self.gradients + self.optimizer + self.teacher

    @property
    def peak(self) -> float:
        return self.state + self.activations + self.transient

    def as_dict(self) -> dict:
        return {**asdict(self), "state": self.state, "peak": self.peak}

    def line(self) -> str:
        return (f"{size(self.peak)} per GPU (weights {size(self.weights)}, logits {size(self.mask_logits)}, prior masks "
                f"{size(self.prior_masks)}, gradients {size(self.gradients)}, optimizer {size(self.optimizer)}, "
                + (f"teacher copy {size(self.teacher)}, " if self.teacher else "")
                + f"activations {size(self.activations + self.transient)} of which mask sampling "
                f"{size(self.mask_sampling)})")


def size(nbytes: float) -> str:
    """Bytes as GB (1e9), or MB below a GB."""
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB else f"{nbytes / 1e6:.1f} MB"


def _shapes(model) -> dict:
    """Per-layer sizes of a ``model_builder.ModelConfig`` (unsharded)."""
    h, f = model.hidden_size, model.ffn_hidden_size
    q, kv = model.num_attention_heads * model.kv_channels, model.num_query_groups * model.kv_channels
    g = 2 if model.gated else 1
    linear = {"linear_qkv": h * (q + 2 * kv), "linear_proj": q * h, "linear_fc1": h * f * g, "linear_fc2": f * h}
    bias = ((q + 2 * kv) * (model.qkv_bias or model.add_bias_linear)
            + (h + f * g + h) * model.add_bias_linear)
    norm = h * (2 if model.normalization == "LayerNorm" else 1)
    return {"h": h, "f": f, "q": q, "kv": kv, "g": g, "linear": linear, "bias": bias, "norm": norm}


def _layer_activations(model, layout: Layout, sh: dict, first_frozen: bool) -> dict:
    """Bytes one layer keeps for its backward, per micro-batch: (tokens part, mask sampling part) by module."""
    t, e = layout.tp, BYTES[layout.dtype]
    sp = t if layout.sequence_parallel else 1
    sb = layout.seq_length * layout.micro_batch_size
    stats = 2 if model.normalization == "LayerNorm" else 1
    h, f, q, kv = sh["h"], sh["f"], sh["q"], sh["kv"]
    norm_in = 0 if first_frozen else 1
    attn = sb * e * (3 * q + 3 * kv) / t + sb * model.num_attention_heads / t * 4
    rope = 4 * layout.seq_length * int(model.kv_channels * model.rotary_percent) * e \
        if model.position_embedding == "rope" else 0
    mlp = sb * e * (5 if model.gated else 2) * f / t
    norms = sb * e * (norm_in + 3) * h / sp + 2 * stats * sb / sp * 4
    # a refit's fixed mask keeps the mask (in the weight's dtype) and the masked weight; sampling keeps the
    # masked weight and the fp32 pattern probabilities
    per_weight = 2 * e if layout.refit else e + 4 * comb(layout.m, layout.n) / layout.m + (4 if layout.hard else 0)
    sampling = {k: sh["linear"][k] / t * per_weight for k in layout.masked}
    selective = layout.recompute_modules if layout.recompute == "selective" else ()
    lse = sb * model.num_attention_heads / t * 4
    if "core_attn" in selective:  # q, k, v are the checkpoint's inputs; the output is linear_proj's input
        attn -= lse
    if "mlp" in selective:  # the MLP's input is the pre-MLP norm's output, kept anyway
        mlp = 0
        sampling = {k: v for k, v in sampling.items() if k not in ("linear_fc1", "linear_fc2")}
    return {"tokens": norms + attn + rope + mlp, "sampling": sum(sampling.values()),
            "sampling_full": sum(sh["linear"][k] / t * per_weight for k in layout.masked),
            "tokens_full": norms + attn + lse * ("core_attn" in selective) + rope + sb * e * (5 if model.gated else 2) * f / t,
            "input": sb * h / sp * e}


def _stage(model, layout: Layout, stage: int) -> Estimate:
    t, e, pp = layout.tp, BYTES[layout.dtype], layout.pp
    sh = _shapes(model)
    layers = model.num_layers // pp
    first, last = stage == 0, stage == pp - 1
    c_over_m = comb(layout.m, layout.n) / layout.m
    masked = layers * sum(sh["linear"][k] for k in layout.masked) / t
    layer_params = sum(sh["linear"].values()) / t + sh["bias"] / t + 2 * sh["norm"]
    vocab = model.padded_vocab_size * model.hidden_size / t
    params = layers * layer_params
    if first:
        params += vocab + (model.max_position_embeddings * model.hidden_size
                           if model.position_embedding == "learned_absolute" else 0)
    if last:
        params += sh["norm"] + (vocab if not model.tie_word_embeddings or pp > 1 else 0)
    weights_trained = 0.0  # besides the logits
    if layout.refit:
        weights_trained = masked
    elif layout.train_weights:
        weights_trained = layers * (sum(sh["linear"][k] for k in layout.masked) / t + sh["bias"] / t + 2 * sh["norm"])
        weights_trained += sh["norm"] if last else 0
    trainable = weights_trained + (0.0 if layout.refit else masked * c_over_m)
    dp_shard = layout.dp if layout.distributed_optimizer else 1
    optimizer = trainable * (2 * 4 + (4 if e != 4 else 0)) / dp_shard

    # activations: micro-batches in flight on this stage (1F1B), per-layer bytes as traced
    in_flight = min(layout.num_microbatches, pp - stage)
    frozen_input = first and layout.recompute != "full"  # the embeddings are frozen; full recompute makes it a leaf
    acts = [_layer_activations(model, layout, sh, first_frozen=frozen_input and i == 0) for i in range(layers)]
    released = 0.0  # what a micro-batch's backward has freed when it rebuilds a chunk
    if layout.recompute == "full":
        n = layout.recompute_num_layers
        if layout.recompute_method == "uniform":
            kept = [a["input"] if i % n == 0 else 0.0 for i, a in enumerate(acts)]
            kept_sampling = [0.0] * layers
            chunks = [acts[i:i + n] for i in range(0, layers, n)]
        else:  # block: the first n layers recomputed one by one, the others keep everything
            kept = [a["input"] if i < n else a["tokens"] for i, a in enumerate(acts)]
            kept_sampling = [0.0 if i < n else a["sampling"] for i, a in enumerate(acts)]
            chunks = [[a] for a in acts[:n]]
        # a chunk rebuilt in the backward holds all its layers' activations (its input is kept already) and
        # its output, which megatron's checkpoint holds while it runs the chunk's backward
        rebuilt = max(sum(a["tokens_full"] + a["sampling_full"] for a in c) for c in chunks)
        if layout.recompute_method == "block" and n < layers:
            # the block's layers come first: when the backward reaches them, the later layers' activations
            # (of this micro-batch) are gone
            released = sum(kept[n:]) + sum(kept_sampling[n:])
    else:
        kept = [a["tokens"] for a in acts]
        kept_sampling = [a["sampling"] for a in acts]
        a = acts[-1]  # selective: the last layer's recomputed modules are rebuilt first (mlp: with its output)
        rebuilt = a["tokens_full"] + a["sampling_full"] - a["tokens"] - a["sampling"]
        if "mlp" in (layout.recompute_modules if layout.recompute == "selective" else ()):
            rebuilt += a["input"]
    sb = layout.seq_length * layout.micro_batch_size
    sp = t if layout.sequence_parallel else 1
    activations = in_flight * (sum(kept) + sum(kept_sampling))
    if not last:  # the pipeline schedule keeps each in-flight micro-batch's output for its backward
        activations += in_flight * sb * sh["h"] / sp * e
    # the two moments the peak falls in: (a) the loss, on the last stage: the final norm, the logits' fp32
    # softmax (and the logits' own copy when they are not fp32), the final norm's output and the hidden
    # state's gradient; (b) the first masked layer's backward (linear_fc2 of the stage's last layer, the
    # loss's buffers freed), with what recompute rebuilt of that layer: the gradients of its input and of
    # its sampled weight, and the hidden state's.
    loss = 0.0
    if last:
        loss = sb * sh["h"] / sp * e + sb / sp * 4 * (2 if model.normalization == "LayerNorm" else 1)
        loss += sb * model.padded_vocab_size / t * (4 + (e if e != 4 else 0)) + 2 * sb * sh["h"] / sp * e
    # the last layer's backward starts with linear_fc2 (the gradients of its input and sampled weight) and
    # then the activation (SwiGLU: the gradients of both halves beside the product's, once linear_fc2 has
    # freed its input, sampled weight and probabilities); the hidden state's gradient is there throughout
    fc2 = sh["linear"]["linear_fc2"] / t if "linear_fc2" in layout.masked else 0.0
    per_weight = 2 * e if layout.refit else e + 4 * c_over_m + (4 if layout.hard else 0)
    act = sb * e * sh["f"] / t
    work = sb * e * sh["h"] / sp + max(act + fc2 * e, act * (2 if model.gated else 1) - fc2 * per_weight)
    first_backward = max(rebuilt - released, 0.0) + work
    sp_buffer = sb * sh["h"] * e if sp > 1 else 0.0  # megatron's all-gather buffer, kept once allocated
    return Estimate(stage=stage, weights=params * e, mask_logits=masked * c_over_m * e,
                    prior_masks=masked if layout.prior else 0.0, gradients=trainable * 4, optimizer=optimizer,
                    activations=activations + sp_buffer, mask_sampling=in_flight * sum(kept_sampling),
                    transient=max(loss, first_backward), teacher=weights_trained * e if layout.teacher_copy else 0.0,
                    detail={"masked_weights": masked, "trainable": trainable, "in_flight": in_flight,
                            "layers": layers, "loss": loss, "first_backward": first_backward,
                            "rebuilt": rebuilt, "sp_buffer": sp_buffer})


def estimate(model, layout: Layout) -> Estimate:
    """Bytes per GPU of ``model`` (``model_builder.ModelConfig``) laid out as ``layout``: the pipeline stage
    with the largest peak."""
    if model.num_layers % layout.pp:
        raise ValueError(f"pp={layout.pp} does not divide num_layers={model.num_layers}")
    return max((_stage(model, layout, s) for s in range(layout.pp)), key=lambda x: x.peak)
