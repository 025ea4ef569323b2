"""The hypercube test of one layer's key vectors."""

from __future__ import annotations

import torch


class KeySpaceLayer:
    """Decides whether key vectors lie inside the forget skill's hypercube at one layer.

    A vector v is inside when |v_d − μ_d| ≤ α·k·σ_d for every dimension d (computed in float64).
    """

    def __init__(self, center: torch.Tensor, scale: torch.Tensor, k: float, alpha: float, device) -> None:
        self.center = center.to(device=device, dtype=torch.float64)
        self.threshold = (scale.to(torch.float64) * (alpha * float(k))).to(device)

    def inside(self, vectors: torch.Tensor) -> torch.Tensor:
        """Bool ``[n]`` for key vectors ``[n, d_ff]``."""
        return ((vectors.to(torch.float64) - self.center).abs() <= self.threshold).all(-1)
