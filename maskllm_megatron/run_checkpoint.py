"""A run checkpoint (the folder kind ``maskllm-train`` writes; ``run_folder`` says which one a run means,
``checkpoint_folders`` checks it) read as the tools that turn a run into a model need it:
``maskllm-export`` and ``maskllm-eval``. Its extra state holds the run's config (read with the driver's
schema, ``run_config``; nothing of the driver), which names the converted checkpoint the run
started from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from maskllm_megatron.checkpoint_folders import MODEL_CONFIG_FILE, RunCheckpointError, read_extra, verify_checkpoint
from maskllm_megatron.convert.checkpoint import CheckpointInfo
from maskllm_megatron.convert.mapping import model_type_of
from maskllm_megatron.masks.patterns import NMSpec
from maskllm_megatron.run_folder import resolve_run_checkpoint, tell
from maskllm_megatron.run_config import TrainConfig


@dataclass(frozen=True)
class RunCheckpoint:
    """A mask-learning checkpoint and what its run config says about it."""

    path: Path
    base: Path  # the converted (dense) checkpoint the run started from: model_config.json + tokenizer/
    info: CheckpointInfo
    nm: NMSpec
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    iteration: Optional[int] = None
    config: dict = field(default_factory=dict)  # the run's TrainConfig, as saved

    def train_config(self) -> TrainConfig:
        """The run's configuration as the driver's ``TrainConfig``."""
        return TrainConfig.from_dict(self.config)

    @classmethod
    def open(cls, path: str | Path, base: str | Path | None = None) -> "RunCheckpoint":
        """Read ``path`` (an ``iter_*`` folder, or a run's ``checkpoints/`` folder or run folder: the
        checkpoint the trainer would resume from, ``run_folder.resolve_run_checkpoint``), after checking its
        files against their digests (a damaged one is a ``CheckpointMismatch`` naming it). ``base``
        overrides the converted checkpoint's location."""
        path = resolve_run_checkpoint(path, say=tell)
        verify_checkpoint(path)  # every file against the digests its rank recorded (once per process)
        extra = read_extra(path)
        config = extra.get("config") if extra else None
        if not config:
            raise RunCheckpointError(f"{path}'s extra state has no run config: pass a checkpoint written by maskllm-train")
        base = Path(base or config["model"]["checkpoint"])
        if not (base / MODEL_CONFIG_FILE).is_file():
            raise RunCheckpointError(f"the run's model checkpoint {base} (model.checkpoint) is not a converted checkpoint "
                              f"folder here: pass --base-ckpt pointing at it")
        mask = config["mask"]
        return cls(path, base.absolute(), CheckpointInfo.load(base), NMSpec.parse(mask["nm"]),
                   tuple(mask["include"]), tuple(mask["exclude"]), extra.get("iteration"), config)

    @property
    def prior_only(self) -> bool:
        """Saved at iteration 0 with a one-shot prior (``run.train_iters=0``): nothing is learned yet, and the
        logits' argmax is the prior blurred by the logits' initial noise, not a mask anyone chose."""
        return (self.iteration == 0 and self.config.get("prior", {}).get("method", "none") != "none"
                and not self.config.get("mask", {}).get("refit", False))

    def check_mask_source(self, use_prior: bool, verb: str) -> None:
        """Refuse the argmax of a prior-only checkpoint (``verb``: what the tool would do with it)."""
        if self.prior_only and not use_prior:
            raise RunCheckpointError(f"{self.path} is a prior-only checkpoint (iteration 0) and holds no learned "
                                     f"masks: pass --use-prior to {verb} its one-shot prior")

    @property
    def model_type(self) -> str:
        return model_type_of(self.info.model, self.info.hf_config)

    def sparsify_config(self):
        """What the run sparsified, as the trainer built it from the same config (``TrainConfig.sparsify_config``)."""
        return self.train_config().sparsify_config()


def build_sparsified(run: RunCheckpoint, folder: Path, *, parallel_output: bool = True):
    """The run's model at the initialised tensor-parallel layout (PP=1), sparsified as the run was, with
    ``folder`` (the run checkpoint itself, or an export of it) loaded: (model, ``load_checkpoint``'s report)."""
    from megatron.core import parallel_state

    from maskllm_megatron.megatron.checkpointing import load_checkpoint
    from maskllm_megatron.megatron.model_builder import build_gpt_model
    from maskllm_megatron.megatron.sparsify import sparsify

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tcfg = run.info.model.to_transformer_config(tp, 1, run.info.dtype, perform_initialization=False)
    model = build_gpt_model(run.info.model, tcfg, parallel_output=parallel_output)
    sparsify(model, run.sparsify_config())
    return model, load_checkpoint(model, folder)


def load_masked_model(run: RunCheckpoint, *, use_prior: bool = False, parallel_output: bool = True):
    """The run's sparsified GPTModel at the initialised layout (PP=1), logits loaded, eval mode;
    with ``use_prior`` every masked layer forwards with its prior mask instead of the argmax."""
    from maskllm_megatron.megatron.sparsify import MaskMode, masked_layers

    model, report = build_sparsified(run, run.path, parallel_output=parallel_output)
    absent = report["absent_masks"]
    if any(k.endswith(".mask_logits") for k in absent):
        raise RunCheckpointError(f"{run.path} has no mask logits for {absent[0]}: it is not a mask-learning "
                                 f"checkpoint of this config")
    for layer in masked_layers(model):
        if use_prior:
            if layer.prior_mask is None:
                raise RunCheckpointError(f"{run.path} stores no prior mask for {layer.mask_layer_id} (the run had "
                                         f"no prior): drop --use-prior")
            layer.set_mask_mode(MaskMode.PRIOR)
    return model.eval()
