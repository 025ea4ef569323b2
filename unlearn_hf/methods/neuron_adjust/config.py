"""Configuration of Neuron Adjust."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig, check_ratio
from ..neurons import NEURON_TOKEN_MODES, check_layer_list

SCORES = ("mean_diff", "abs_mean_diff", "standardized")


@dataclass
class NeuronAdjustConfig(MethodConfig):
    """Neuron Adjust (METHOD.md §3): move selected pre-activation neurons from the forget distribution to the
    retain distribution.

    Args:
        ratio: fraction in (0, 1] of all pre-activation neurons of all (chosen) layers to adjust, selected
            globally across layers; the count is ``round(ratio * total)`` with halves rounded up, at least 1
            (see :func:`unlearn_hf.methods.neurons.selection_size`). Paper: 0.03 for math/code, 0.005 for
            languages.
        score: neuron ranking. ``"mean_diff"`` = μF − μR (the paper's one-sided score), ``"abs_mean_diff"`` =
            |μF − μR|, ``"standardized"`` = (μF − μR) / sqrt((σF² + σR²) / 2). Ties go to the lower layer, then
            the lower neuron index.
        tokens: which tokens are probed: ``"all"`` real tokens (padding never counts), or only the ``"prompt"``
            / ``"completion"`` part of prompt + completion pairs (needs ``prompt_column``/``completion_column``).
        eps: floor of the standard deviations: a neuron with (near) zero variance gets σ = eps, so its density
            is a narrow but finite peak (no division by zero).
        layers: restrict probing and selection to these layer indices (negative ones count from the end;
            ``None`` = all layers).
        seed: seed of the replacement draws. Each request (a ``generate`` call, or a forward without cache)
            restarts a ``torch.Generator`` from it, so the same input gives the same output. Override it for a
            block of calls with ``NeuronAdjust.seeded(seed)``.
        deterministic: replace whenever pF > pR, instead of with probability pF / (pF + pR).
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
        if not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}.")
        self.layers = check_layer_list(self.layers)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic must be True or False, got {self.deterministic!r}.")
