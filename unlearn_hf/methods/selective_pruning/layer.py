"""Zeroing the pruned neurons of one key site."""

from __future__ import annotations

import torch


class SelectivePruningLayer:
    """Sets the selected key-site neurons (inputs of the FFL output projection) to zero.

    Args:
        neurons: indices of the pruned neurons in this layer.
        device: the layer's device (the index moves along if the model moves).
    """

    def __init__(self, neurons: torch.Tensor, device: torch.device | str = "cpu") -> None:
        self._neurons_cpu = neurons.detach().to("cpu", torch.long).flatten()
        self.prepare(torch.device(device))

    @property
    def num_neurons(self) -> int:
        return self._neurons_cpu.numel()

    def prepare(self, device: torch.device) -> None:
        self.neurons = self._neurons_cpu.to(device)
        self.device = device

    def __call__(self, key: torch.Tensor) -> torch.Tensor:
        """A copy of ``key[..., d_ff]`` with the pruned columns set to zero (one ``index_fill``)."""
        if key.device != self.device:
            self.prepare(key.device)
        return key.index_fill(-1, self.neurons, 0)
