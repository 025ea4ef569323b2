"""Configuration of Neuron Adjust."""

from __future__ import annotations

from dataclasses import dataclass

from .. import config as cfg
from ..config import NeuronSelectionConfig

SCORES = ("mean_diff", "abs_mean_diff", "standardized")


@dataclass(frozen=True)
class NeuronAdjustConfig(NeuronSelectionConfig):
    """Neuron Adjust (``docs/METHOD.md`` §3): move selected pre-activation neurons from the forget distribution to the
    retain distribution.

    Takes the fields of :class:`~unlearn_hf.methods.config.NeuronSelectionConfig` (``ratio`` of all pre-activation
    neurons, possibly ``"auto"``; paper: 0.03 for math/code, 0.005 for languages; ``tokens``, ``layers``, ...),
    and:

    Args:
        score: neuron ranking. ``"mean_diff"`` = μF − μR (the paper's one-sided score), ``"abs_mean_diff"`` =
            |μF − μR|, ``"standardized"`` = (μF − μR) / sqrt((σF² + σR²) / 2). Ties go to the lower layer, then
            the lower neuron index.
        eps: floor of the standard deviations: a neuron with (near) zero variance gets σ = eps, so its density
            is a narrow but finite peak (no division by zero).
        seed: seed of the replacement draws. Each request (a ``generate`` call, or a forward without cache)
            restarts a ``torch.Generator`` from it, so the same input gives the same output. Override it for a
            block of calls with ``NeuronAdjust.seeded(seed)``.
        deterministic: replace whenever pF > pR, instead of with probability pF / (pF + pR). Recommended for
            scoring: the random draws of a request depend on its batch shape, the deterministic rule does not.
    """

    method_type = "neuron_adjust"

    score: str = "mean_diff"
    eps: float = 1e-5
    seed: int = 0
    deterministic: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("score", cfg.choice("score", self.score, SCORES))
        self._set("eps", cfg.positive_float("eps", self.eps, cfg.MAX_EPS))
        self._set("seed", cfg.integer("seed", self.seed, lo=-(2**63), hi=2**64 - 1))
        self._set("deterministic", cfg.flag("deterministic", self.deterministic))
