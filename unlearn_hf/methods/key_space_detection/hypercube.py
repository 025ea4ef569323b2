"""The hypercube of one layer: its fitted radius, and the test of whether key vectors lie inside it."""

from __future__ import annotations

import torch


def hypercube_radius(
    mean: torch.Tensor, std: torch.Tensor, minimum: torch.Tensor, maximum: torch.Tensor
) -> float:
    """The smallest k with every probe vector inside μ ± k·σ: max over d of max(max−μ, μ−min)/σ (exact)."""
    return float(torch.maximum(maximum - mean, mean - minimum).div(std).max())


class KeySpaceLayer:
    """Decides whether key vectors lie inside the forget skill's hypercube at one layer.

    A vector v is inside when |v_d − μ_d| / σ_d ≤ α·k for every dimension d, i.e. when its largest standardized
    distance :meth:`distance` is at most α·k. The test is computed in float64 (float32 on devices without
    float64) and divides exactly as the fit computed k, so at α = 1 every fitted vector is inside, including the
    ones that set k.

    Args:
        center: μ, ``[d_ff]``.
        scale: σ (floored, positive), ``[d_ff]``.
        k: the fitted radius multiplier.
        alpha: the user's multiplier of k.
        device: where the test runs (the key module's device).
    """

    def __init__(self, center: torch.Tensor, scale: torch.Tensor, k: float, alpha: float, device) -> None:
        device = torch.device(device)
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.center = center.to(device=device, dtype=self.dtype)
        self.scale = scale.to(device=device, dtype=self.dtype)
        self.k = float(k)
        self.alpha = float(alpha)
        self.threshold = self.alpha * self.k

    def distance(self, vectors: torch.Tensor) -> torch.Tensor:
        """Largest standardized distance max_d |v_d − μ_d| / σ_d of each key vector ``[..., d_ff]`` -> ``[...]``."""
        return (vectors.to(self.dtype) - self.center).abs_().div_(self.scale).amax(-1)

    def inside(self, vectors: torch.Tensor) -> torch.Tensor:
        """Bool ``[...]`` for key vectors ``[..., d_ff]``."""
        return self.distance(vectors) <= self.threshold
