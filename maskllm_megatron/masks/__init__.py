"""Pure-torch N:M mask mathematics (no Megatron import): patterns, sampling, schedules, priors."""
from .config import MaskConfig, MaskStep
from .patterns import (NMSpec, candidate_patterns, check_groupable, is_valid_nm, mask_to_patterns,
                       patterns_to_mask, topn_mask)
from .sampling import (apply_prior, gumbel_noise, hard_mask, init_key, init_logits, logits_shape,
                       masked_weight, noise_key, prior_overlap, soft_mask)
from .schedules import Anneal

__all__ = [
    "Anneal", "MaskConfig", "MaskStep", "NMSpec", "apply_prior", "candidate_patterns", "check_groupable",
    "gumbel_noise", "hard_mask", "init_key", "init_logits", "is_valid_nm", "logits_shape", "mask_to_patterns",
    "masked_weight", "noise_key", "patterns_to_mask", "prior_overlap", "soft_mask", "topn_mask",
]
