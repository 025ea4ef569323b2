"""Zeroing the pruned neurons of one key site."""

from __future__ import annotations

import torch


class SelectivePruningLayer:
    """Sets the selected key-site neurons (inputs of the FFL output projection) to zero."""

    def __init__(self, neurons: torch.Tensor, device: torch.device) -> None:
        self.neurons = neurons.to(device=device, dtype=torch.long)

    def __call__(self, key: torch.Tensor) -> torch.Tensor:
        return key.index_fill(-1, self.neurons, 0)
