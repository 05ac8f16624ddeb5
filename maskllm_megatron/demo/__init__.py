"""``make demo``: the whole MaskLLM pipeline on a real model on this CPU, end to end.

    python -m maskllm_megatron.demo [--minutes 9.5] [--refit-iters 0] [--out demo_out]

Stages (each cached by the content of its inputs and settings under ``<cache>/demo``; a re-run reuses
finished stages, and a failed stage says how to resume):
  1. the real SmolLM2-135M model (Llama architecture) and the real Wikipedia excerpt, by package name;
  2. HF -> megatron-core conversion (TP=1: SmolLM2's 9 heads / 3 KV groups do not split over 2 ranks);
  3. preprocessing: the training articles into an indexed dataset; whole held-out articles kept apart;
  4. one-shot 2:4 priors: magnitude, Wanda, SparseGPT (mask only), calibrated on training articles;
  5. MaskLLM mask learning, torchrun with 2 processes (data parallel), frozen weights, from the best
     prior, for a wall-clock budget (--minutes), turned into iterations by a timed probe of the same run;
  6. export of the learned 2:4 model to a Hugging Face folder, verified; with --refit-iters N, the kept
     weights then refit under the learned masks (``mask.refit``, distilled from the dense model), exported;
  7. held-out perplexity of dense, each prior, MaskLLM (and MaskLLM + refit): a Markdown table with each
     stage's wall time, a PNG bar chart and the training curves.
"""
from .pipeline import (LEARN_STAGE_FORMAT, PRIORS, PROBE_ITERS, SpeedPlan, convert_stage, copy_run_records,
                       data_stage, export_stage, extra_path_bytes, final_checkpoint, folder_digest, heldout_ppl,
                       learn_stage, learn_wall_s, plan_from_probe, prior_stage, probe_stage, reconstruct_stage,
                       refit_stage)
from .recipe import (DEMO_LEARN_MINUTES, DEMO_RECONSTRUCTION, DEMO_REFIT_ITERS, DP, MASK_LR_MULT, RECONSTRUCTIONS, SEQ, LearnRecipe, Reconstruction,
                     WeightRefit, add_recipe_arguments, recipe_from_args, train_config)
from .stages import Interrupted, Stages, rerun_command, run_logged, stage_key
from .cli import main  # noqa: E402 (cli reads this package's docstring)

__all__ = [
    "DEMO_LEARN_MINUTES", "DEMO_RECONSTRUCTION", "DEMO_REFIT_ITERS", "DP", "Interrupted", "LEARN_STAGE_FORMAT", "LearnRecipe",
    "MASK_LR_MULT", "PRIORS", "PROBE_ITERS", "RECONSTRUCTIONS", "Reconstruction", "SEQ", "SpeedPlan", "Stages",
    "WeightRefit", "add_recipe_arguments", "convert_stage",
    "copy_run_records", "data_stage", "export_stage", "extra_path_bytes", "final_checkpoint", "folder_digest",
    "heldout_ppl", "learn_stage", "learn_wall_s", "main", "plan_from_probe", "prior_stage", "probe_stage",
    "recipe_from_args", "reconstruct_stage",
    "refit_stage", "rerun_command", "run_logged", "stage_key", "train_config",
]
