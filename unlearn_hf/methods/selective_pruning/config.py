"""Configuration of Selective Pruning."""

from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig, check_ratio
from ..neurons import NEURON_TOKEN_MODES


@dataclass
class SelectivePruningConfig(MethodConfig):
    """Selective Pruning (Pochinkov & Schoots 2023; METHOD.md §5), the paper's baseline: zero the key-site
    neurons most important to the forget set relative to the retain set.

    Args:
        ratio: fraction of all key neurons of all (chosen) layers to prune, selected globally.
        tokens: which tokens are probed (``"all"``, ``"prompt"``, ``"completion"``).
        eps: added to the retain mean |x| in the importance ratio mean|x|_F / (mean|x|_R + eps).
        layers: restrict selection to these layers (``None`` = all).
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
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}.")
        if self.layers is not None:
            self.layers = [int(i) for i in self.layers]
