"""Configuration of Selective Pruning."""

from __future__ import annotations

from dataclasses import dataclass

from .. import config as cfg
from ..config import NEURON_TOKEN_MODES, MethodConfig


@dataclass(frozen=True)
class SelectivePruningConfig(MethodConfig):
    """Selective Pruning (Pochinkov & Schoots 2023; ``docs/METHOD.md`` §5), the paper's baseline: zero the key-site
    neurons (inputs of the FFL output projection) most important to the forget set relative to the retain set.

    Args:
        ratio: fraction in (0, 1] of all key neurons of all (chosen) layers to prune, selected globally; the
            count is ``round(ratio * total)`` with halves rounded up, at least 1. Ties go to the lower layer,
            then the lower neuron index.
        tokens: which tokens are probed (``"all"``, ``"prompt"``, ``"completion"``; padding never counts).
        eps: added to the retain mean |x| in the importance mean|x|_F / (mean|x|_R + eps), so neurons that are
            silent on the retain set get a large finite importance.
        layers: restrict probing and selection to these layers (negative ones count from the end;
            ``None`` = all).
    """

    method_type = "selective_pruning"

    ratio: float = 0.03
    tokens: str = "all"
    eps: float = 1e-6
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        self._set("ratio", cfg.ratio("ratio", self.ratio))
        self._set("tokens", cfg.choice("tokens", self.tokens, NEURON_TOKEN_MODES))
        self._set("eps", cfg.positive_float("eps", self.eps, cfg.MAX_EPS))
        self._set("layers", cfg.layer_list("layers", self.layers))
