"""Configuration of Selective Pruning."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig, check_ratio
from ..neurons import NEURON_TOKEN_MODES, check_layer_list


@dataclass
class SelectivePruningConfig(MethodConfig):
    """Selective Pruning (Pochinkov & Schoots 2023; METHOD.md §5), the paper's baseline: zero the key-site
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
        check_ratio(self.ratio)
        if self.tokens not in NEURON_TOKEN_MODES:
            raise ValueError(f"tokens must be one of {NEURON_TOKEN_MODES}, got {self.tokens!r}.")
        if not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}.")
        self.layers = check_layer_list(self.layers)
