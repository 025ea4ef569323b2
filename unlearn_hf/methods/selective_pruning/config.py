"""Configuration of Selective Pruning."""

from __future__ import annotations

from dataclasses import dataclass

from .. import config as cfg
from ..config import NeuronSelectionConfig


@dataclass(frozen=True)
class SelectivePruningConfig(NeuronSelectionConfig):
    """Selective Pruning (Pochinkov & Schoots 2023; ``docs/METHOD.md`` §5), the paper's baseline: zero the key-site
    neurons (inputs of the FFL output projection) most important to the forget set relative to the retain set.

    Takes the fields of :class:`~unlearn_hf.methods.config.NeuronSelectionConfig` (``ratio`` of all key neurons,
    possibly ``"auto"``, ``tokens``, ``layers``, ...; ties go to the lower layer, then the lower neuron index), and:

    Args:
        eps: added to the retain mean |x| in the importance mean|x|_F / (mean|x|_R + eps), so neurons that are
            silent on the retain set get a large finite importance.
    """

    method_type = "selective_pruning"

    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("eps", cfg.positive_float("eps", self.eps, cfg.MAX_EPS))
