"""The hypercube of one layer: its fitted radius, and the test of whether key vectors lie inside it."""

from __future__ import annotations

import torch

from ...stats import NO_FLOAT64

#: the floor of k in scaled distances (a hypercube of identical keys has k = 0)
_TINY_K = 1e-12


def distance_dtype(device: torch.device | str) -> torch.dtype:
    """Where distances are computed in float64, or float32 on devices without it."""
    return torch.float32 if torch.device(device).type in NO_FLOAT64 else torch.float64


def standardized_distance(
    vectors: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``max_d |v_d − μ_d| / σ_d`` of vectors ``[..., d]`` -> ``[...]`` (in ``dtype``)."""
    return (vectors.to(dtype) - center).abs_().div_(scale).amax(-1)


def scaled_distance(
    vectors: torch.Tensor,
    center: torch.Tensor,
    scale: torch.Tensor,
    k: float,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``max_d |v_d − μ_d| / σ_d / k``: inside the hypercube at α when at most α."""
    return standardized_distance(vectors, center, scale, dtype).div_(max(float(k), _TINY_K))


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
    ones that set k, in the dtype the model was fitted in: in another one (a bfloat16 cast, autocast) the keys
    round differently and a vector on the boundary may fall just outside, so an uncalibrated α = 1 has no margin
    (calibration's α keeps one). A vector with a NaN or an inf counts as inside: the row abstains.

    Args:
        center: μ, ``[d_ff]``.
        scale: σ (floored, positive), ``[d_ff]``.
        k: the fitted radius multiplier.
        alpha: the user's multiplier of k.
        device: where the test runs (the key module's device); vectors that arrive on another device (the model
            was moved since) move the hypercube there.
    """

    def __init__(self, center: torch.Tensor, scale: torch.Tensor, k: float, alpha: float, device) -> None:
        self._fitted = (center.detach(), scale.detach())
        self._place(torch.device(device))
        self.k = float(k)
        self.alpha = float(alpha)
        self.threshold = self.alpha * self.k

    def _place(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        """``(μ, σ, dtype)`` on ``device``, set in one assignment (a forward in another thread reads the old or the
        new placement, never a mix)."""
        dtype = distance_dtype(device)
        self._placed = placed = (*(t.to(device=device, dtype=dtype) for t in self._fitted), dtype)
        return placed

    def _on(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        placed = self._placed
        return placed if placed[0].device == vectors.device else self._place(vectors.device)

    @property
    def center(self) -> torch.Tensor:
        return self._placed[0]

    @property
    def scale(self) -> torch.Tensor:
        return self._placed[1]

    @property
    def dtype(self) -> torch.dtype:
        return self._placed[2]

    def distance(self, vectors: torch.Tensor) -> torch.Tensor:
        """Largest standardized distance max_d |v_d − μ_d| / σ_d of each key vector ``[..., d_ff]`` -> ``[...]``."""
        return standardized_distance(vectors, *self._on(vectors))

    def scaled(self, vectors: torch.Tensor) -> torch.Tensor:
        """:func:`scaled_distance` of key vectors ``[..., d_ff]`` (what calibration compares with α)."""
        center, scale, dtype = self._on(vectors)
        return scaled_distance(vectors, center, scale, self.k, dtype)

    def inside(self, vectors: torch.Tensor) -> torch.Tensor:
        """Bool ``[...]`` for key vectors ``[..., d_ff]``; a vector with a NaN or an inf counts as inside (see
        :func:`inside_at`)."""
        return inside_at(self.distance(vectors), self.threshold)


def inside_at(distances: torch.Tensor, threshold: float) -> torch.Tensor:
    """``distances <= threshold``, and ``True`` where a distance is not finite: a key vector with a NaN or an inf (a
    forward broken by float16 overflow, or NaN that padding spread through the attention) cannot be placed, and a
    row that cannot be placed abstains rather than answer (it fails closed)."""
    return (distances <= threshold) | ~distances.isfinite()
