"""Configuration of Neuron Adjust."""

from __future__ import annotations

from dataclasses import dataclass

from .. import config as cfg
from ..config import NEURON_TOKEN_MODES, MethodConfig

SCORES = ("mean_diff", "abs_mean_diff", "standardized")


@dataclass(frozen=True)
class NeuronAdjustConfig(MethodConfig):
    """Neuron Adjust (``docs/METHOD.md`` §3): move selected pre-activation neurons from the forget distribution to the
    retain distribution.

    Args:
        ratio: fraction in (0, 1] of all pre-activation neurons of all (chosen) layers to adjust, selected
            globally across layers; the count is ``round(ratio * total)`` with halves rounded up, at least 1
            (see :func:`unlearn_hf.methods.selection.selection_size`). Paper: 0.03 for math/code, 0.005 for
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
        self._set("ratio", cfg.ratio("ratio", self.ratio))
        self._set("score", cfg.choice("score", self.score, SCORES))
        self._set("tokens", cfg.choice("tokens", self.tokens, NEURON_TOKEN_MODES))
        self._set("eps", cfg.positive_float("eps", self.eps, cfg.MAX_EPS))
        self._set("layers", cfg.layer_list("layers", self.layers))
        self._set("seed", cfg.integer("seed", self.seed, lo=-(2**63), hi=2**64 - 1))
        self._set("deterministic", cfg.flag("deterministic", self.deterministic))
