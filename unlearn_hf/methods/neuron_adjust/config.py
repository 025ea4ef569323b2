"""Configuration of Neuron Adjust."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig, check_ratio
from ..neurons import NEURON_TOKEN_MODES

SCORES = ("mean_diff", "abs_mean_diff", "standardized")


@dataclass
class NeuronAdjustConfig(MethodConfig):
    """Neuron Adjust (METHOD.md §3): shift selected pre-activation neurons from the forget distribution to the
    retain distribution.

    Args:
        ratio: fraction of all FFL neurons of all (chosen) layers to adjust, selected globally (paper: 0.03 for
            math/code, 0.005 for languages).
        score: neuron ranking. ``"mean_diff"`` = μF − μR (the paper's one-sided score), ``"abs_mean_diff"`` =
            |μF − μR|, ``"standardized"`` = (μF − μR) / sqrt((σF² + σR²) / 2).
        tokens: which tokens are probed: ``"all"`` real tokens, or only the ``"prompt"`` / ``"completion"`` part
            of prompt + completion pairs.
        eps: floor of the standard deviations (neurons with zero variance get σ = eps).
        layers: restrict selection to these layer indices (``None`` = all layers).
        seed: seed of the replacement draws. Each request (``generate`` call or fresh forward) restarts from it,
            so the same input gives the same output.
        deterministic: replace whenever pF > pR instead of with probability pF / (pF + pR).
    """

    method_type = "neuron_adjust"

    ratio: float = 0.03
    score: str = "mean_diff"
    tokens: str = "all"
    eps: float = 1e-5
    layers: list[int] | None = None
    seed: int = 0
    deterministic: bool = False

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}.")
        if self.tokens not in NEURON_TOKEN_MODES:
            raise ValueError(f"tokens must be one of {NEURON_TOKEN_MODES}, got {self.tokens!r}.")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}.")
        if self.layers is not None:
            self.layers = [int(i) for i in self.layers]
        self.seed = int(self.seed)
