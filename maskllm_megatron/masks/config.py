"""The typed configuration of mask learning and the per-step sampling state."""
from __future__ import annotations

from dataclasses import dataclass, field

from .patterns import NMSpec
from .schedules import Anneal


@dataclass(frozen=True)
class MaskConfig:
    """How masks are parametrised, initialised and sampled. Defaults: the MaskLLM paper's recipe.

    ``total_steps`` is the number of training iterations the schedules anneal over.
    """

    nm: NMSpec = field(default_factory=NMSpec)
    total_steps: int = 2000
    temperature: tuple[float, float] = (4.0, 0.05)
    logit_scale: tuple[float, float] = (1e2, 5e2)
    schedule_kind: str = "linear"
    hard: bool = False  # straight-through hard samples instead of soft Gumbel-softmax masks
    init_std: float = 0.01  # logits start as N(0, init_std)
    prior_strength: float = 3.0  # 0 means no prior
    regularizer: tuple[float, float] = (1e-5, 0.0)  # coefficient of sum((W*mask)^2), decays linearly
    seed: int = 1234

    def __post_init__(self):
        if isinstance(self.nm, str):
            object.__setattr__(self, "nm", NMSpec.parse(self.nm))
        # each message starts with the field it refuses (the driver's config prefixes its section)
        for name in ("temperature", "logit_scale"):
            if min(getattr(self, name)) <= 0:
                raise ValueError(f"{name} {getattr(self, name)} must stay positive (start, end)")
        if min(self.regularizer) < 0:
            raise ValueError(f"regularizer {self.regularizer} must be >= 0 (start, end)")
        for name in ("init_std", "prior_strength"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 0 (0: no {'prior' if name == 'prior_strength' else 'noise'})")
        self.temperature_schedule  # validates steps and kind

    @property
    def temperature_schedule(self) -> Anneal:
        return Anneal(*self.temperature, self.total_steps, self.schedule_kind)

    @property
    def scale_schedule(self) -> Anneal:
        return Anneal(*self.logit_scale, self.total_steps, self.schedule_kind)

    @property
    def regularizer_schedule(self) -> Anneal:
        return Anneal(*self.regularizer, self.total_steps, "linear")

    def step_state(self, iteration: int, microbatch: int = 0, grad_scale: float = 1.0) -> "MaskStep":
        """The sampling state for one micro-batch of iteration ``iteration``; ``microbatch`` numbers the
        micro-batches of the whole global batch, over all data-parallel ranks.

        ``grad_scale`` is what the LM loss is multiplied by before backward (loss scale divided by
        the number of micro-batches), so the regulariser's gradient gets the same treatment.
        """
        return MaskStep(
            iteration=iteration, microbatch=microbatch,
            temperature=self.temperature_schedule(iteration), scale=self.scale_schedule(iteration),
            regularizer=self.regularizer_schedule(iteration) * grad_scale, hard=self.hard, seed=self.seed,
        )


@dataclass(frozen=True)
class MaskStep:
    """Everything a masked layer needs to sample its mask for one micro-batch."""

    iteration: int = 0
    microbatch: int = 0  # index in the global batch (micro-batch m of DP rank r: m * dp_size + r)
    temperature: float = 4.0
    scale: float = 1e2
    regularizer: float = 0.0
    hard: bool = False
    seed: int = 1234
