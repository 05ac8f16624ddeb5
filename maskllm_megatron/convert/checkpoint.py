"""The converted checkpoint folder's model record and loading (the folder kind: ``checkpoint_folders``).

The folder holds a megatron-core ``dist_checkpointing`` checkpoint (any TP/PP layout, loadable at any
other), ``model_config.json`` (``CheckpointInfo``: the ``ModelConfig``, dtype, the layout it was written
with and the original HF ``config.json``) and ``tokenizer/`` (the HF tokenizer files).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maskllm_megatron.checkpoint_folders import MODEL_CONFIG_FILE, looks_like_run
from maskllm_megatron.convert.io import ConversionError, read_json
from maskllm_megatron.megatron.model_builder import DTYPES, ModelConfig

FORMAT = "maskllm-megatron/mcore-checkpoint-v1"


@dataclass
class CheckpointInfo:
    """What ``model_config.json`` holds."""

    model: ModelConfig
    dtype: str = "fp32"
    tp: int = 1
    pp: int = 1
    hf_config: dict = field(default_factory=dict)
    source: str = ""
    ep: int = 1

    def save(self, folder: Path) -> None:
        d = {"format": FORMAT, "model": self.model.to_dict(), "dtype": self.dtype, "tp": self.tp, "pp": self.pp,
             "ep": self.ep, "hf_config": self.hf_config, "source": self.source}
        (folder / MODEL_CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "CheckpointInfo":
        folder = Path(folder)
        path = folder / MODEL_CONFIG_FILE
        if not folder.exists():
            raise ConversionError(f"{folder} does not exist: pass a checkpoint written by maskllm-convert hf-to-mcore")
        if looks_like_run(folder):
            raise ConversionError(f"{folder} is a mask-learning run checkpoint: turn it into a model with "
                                  f"maskllm-export --ckpt {folder} (--format mcore or hf)")
        if not path.is_file():
            raise ConversionError(f"{folder} has no {MODEL_CONFIG_FILE}: pass a checkpoint written by maskllm-convert "
                                  "hf-to-mcore (or maskllm-export --format mcore)")
        d = read_json(path)
        if d.get("format") != FORMAT:
            raise ConversionError(f"{path} has format {d.get('format')!r}, expected {FORMAT!r}")
        return cls(ModelConfig.from_dict(d["model"]), d["dtype"], d["tp"], d["pp"], d.get("hf_config", {}),
                   d.get("source", ""), d.get("ep", 1))


def load_mcore_model(ckpt_dir: str | Path, *, parallel_output: bool = True):
    """Build the checkpoint's GPTModel (in its dtype) for the initialised parallel layout (see
    ``megatron.parallel.init_parallel``; any TP/PP/EP, whatever the checkpoint was saved with) and load its weights.

    Returns ``(model, info)``; the model is in eval mode.
    """
    from maskllm_megatron.megatron.checkpointing import load_sharded
    from maskllm_megatron.megatron.model_builder import build_gpt_model

    info = CheckpointInfo.load(ckpt_dir)
    model = build_gpt_model(info.model, info.model.to_transformer_config(
        _tp(), _pp(), info.dtype, ep=_ep(), perform_initialization=False), parallel_output=parallel_output)
    state = load_sharded(model.sharded_state_dict(), Path(ckpt_dir).absolute())
    model.load_state_dict(state)
    return model.eval(), info


def _tp() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def _pp() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()


def _ep() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_expert_model_parallel_world_size()


def global_param_names(model) -> dict[str, torch.nn.Parameter]:
    """``{name with global layer numbers and global expert indices: parameter}`` of this rank's (pipeline
    stage and expert-parallel share of the) model (``model_builder.global_module_names``)."""
    from maskllm_megatron.megatron.model_builder import global_module_names

    modules, _ = global_module_names(model)
    out = {}
    for name, p in model.named_parameters():
        module, _, param = name.rpartition(".")
        out[f"{modules[module]}.{param}" if module else param] = p
    return out


def tp_rank_and_size(name: str) -> tuple[int, int]:
    """This rank's tensor-parallel rank and size for the parameter ``name``: the expert tensor-parallel
    group's for routed experts, the tensor-parallel group's otherwise."""
    from megatron.core import parallel_state

    from maskllm_megatron.megatron.model_builder import is_expert_name

    if is_expert_name(name):
        return (parallel_state.get_expert_tensor_parallel_rank(), parallel_state.get_expert_tensor_parallel_world_size())
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def tp_group_of(name: str):
    """The group a parameter ``name``'s tensor-parallel shards are gathered over (see ``tp_rank_and_size``)."""
    from megatron.core import parallel_state

    from maskllm_megatron.megatron.model_builder import is_expert_name

    return (parallel_state.get_expert_tensor_parallel_group() if is_expert_name(name)
            else parallel_state.get_tensor_model_parallel_group())


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
