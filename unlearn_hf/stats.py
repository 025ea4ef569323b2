"""Mergeable running statistics (count, mean, M2, mean |x|, min, max) in float64.

Batches are combined with Chan et al.'s parallel formula, so two partial results merge exactly (up to float64
rounding): probing can be resumed, extended with more data, or split across processes and all-reduced.
Memory is O(layers × d_ff), never O(tokens).

Device: the sums are kept on the activations' device in float64, with no copy to the host per batch (a copy
would wait for the device); :meth:`RunningStats.to_` moves them at the end. A device without float64
(Apple MPS) accumulates on the host instead: its activations are copied there, batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_CHUNK_ROWS = 1024

#: Device types without float64 arithmetic: their activations are accumulated on the host.
NO_FLOAT64 = frozenset({"mps"})


def accumulation_device(device: torch.device | str) -> torch.device:
    """Where float64 statistics of activations on ``device`` are accumulated: there, or on the host."""
    device = torch.device(device)
    return torch.device("cpu") if device.type in NO_FLOAT64 else device


@dataclass
class RunningStats:
    """Per-dimension running statistics of a stream of vectors of width ``dim``.

    Attributes:
        count: number of vectors seen.
        mean: running mean, float64 ``[dim]``.
        m2: sum of squared deviations from the mean, float64 ``[dim]``.
        abs_sum: sum of ``|x|``, float64 ``[dim]``.
        minimum / maximum: per-dimension extremes (``None`` unless ``track_extremes``).
    """

    dim: int
    track_extremes: bool = False
    count: int = 0
    mean: torch.Tensor = field(default=None)  # type: ignore[assignment]
    m2: torch.Tensor = field(default=None)  # type: ignore[assignment]
    abs_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    minimum: torch.Tensor | None = None
    maximum: torch.Tensor | None = None

    def __post_init__(self) -> None:
        zeros = lambda: torch.zeros(self.dim, dtype=torch.float64)  # noqa: E731
        self.mean = zeros() if self.mean is None else self.mean
        self.m2 = zeros() if self.m2 is None else self.m2
        self.abs_sum = zeros() if self.abs_sum is None else self.abs_sum
        if self.track_extremes and self.minimum is None:
            self.minimum = torch.full((self.dim,), float("inf"), dtype=torch.float64)
            self.maximum = torch.full((self.dim,), float("-inf"), dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of vectors ``x`` of shape ``[n, dim]`` (any dtype/device)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Expected activations of shape [n, {self.dim}], got {tuple(x.shape)}.")
        n = x.shape[0]
        if n == 0:
            return
        x = x.detach()
        device = accumulation_device(x.device)
        if x.device != device:
            x = x.to(device)
        # three reductions accumulated in float64, over float64 copies of row chunks: a bounded transient
        # (``_CHUNK_ROWS`` rows) and several times faster than reducing float32 with ``dtype=float64``. The copy
        # is forced (``copy=True``) because it is modified in place: float64 activations must stay untouched.
        # Within a batch M2 = Σx² − n·mean² (float64 keeps the cancellation harmless at activation scales).
        f64 = torch.float64
        total = torch.zeros(self.dim, dtype=f64, device=x.device)
        sumsq, abs_sum = total.clone(), total.clone()
        for chunk in x.split(_CHUNK_ROWS):
            c = chunk.to(f64, copy=True)
            total += c.sum(0)
            abs_sum += c.abs_().sum(0)
            sumsq += c.square_().sum(0)
        mean_b = total / n
        m2_b = (sumsq - mean_b * total).clamp_min_(0)
        batch = RunningStats(self.dim, self.track_extremes, n, mean_b, m2_b, abs_sum)
        if self.track_extremes:
            batch.minimum, batch.maximum = x.amin(0).to(f64), x.amax(0).to(f64)
        if self.count and self.mean.device != device:
            self.to_(device)
        self.merge_(batch)

    def to_(self, device: torch.device | str) -> RunningStats:
        """Move the statistics to ``device`` in place and return ``self``."""
        for name in ("mean", "m2", "abs_sum", "minimum", "maximum"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def merge_(self, other: RunningStats) -> RunningStats:
        """Merge ``other`` into ``self`` in place (Chan's formula) and return ``self``."""
        if other.dim != self.dim or other.track_extremes != self.track_extremes:
            raise ValueError("Cannot merge statistics of different widths or kinds.")
        if other.count == 0:
            return self
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.clone(), other.m2.clone()
            self.abs_sum = other.abs_sum.clone()
            if self.track_extremes:
                self.minimum, self.maximum = other.minimum.clone(), other.maximum.clone()
            return self
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + other.m2 + delta.square() * (n_a * n_b / n)
        self.abs_sum = self.abs_sum + other.abs_sum
        self.count = n
        if self.track_extremes:
            self.minimum = torch.minimum(self.minimum, other.minimum)
            self.maximum = torch.maximum(self.maximum, other.maximum)
        return self

    def merge(self, other: RunningStats) -> RunningStats:
        """Return a new object holding the statistics of both ``self`` and ``other``."""
        return self.copy().merge_(other)

    def copy(self) -> RunningStats:
        out = RunningStats(self.dim, self.track_extremes)
        return out.merge_(self) if self.count else out

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance (``M2 / (count - 1)``); requires at least two vectors."""
        if self.count < 2:
            raise ValueError(f"The sample variance needs at least 2 values, got {self.count}.")
        return self.m2 / (self.count - 1)

    def std(self, eps: float = 0.0) -> torch.Tensor:
        """Sample standard deviation, floored at ``eps``."""
        return self.variance.sqrt().clamp_min(eps)

    @property
    def abs_mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("No values were seen.")
        return self.abs_sum / self.count


@dataclass
class SiteStatistics:
    """Statistics of one site kind (``"pre"`` or ``"key"``) for several layers, as returned by the probe.

    Attributes:
        site: ``"pre"`` (pre-activation) or ``"key"`` (input of the output projection).
        mode: which tokens were counted (``"all"``, ``"prompt"``, ``"completion"`` or ``"last"``).
        layers: layer index -> :class:`RunningStats`.
        architecture_id: short description of the probed model, used to refuse merging unrelated results.
    """

    site: str
    mode: str
    layers: dict[int, RunningStats]
    architecture_id: str = ""

    def merge(self, other: SiteStatistics) -> SiteStatistics:
        """Combine two probe results of the same site, mode, layers and model."""
        if (self.site, self.mode, sorted(self.layers)) != (other.site, other.mode, sorted(other.layers)):
            raise ValueError(
                f"Cannot merge statistics of site/mode/layers {self.site}/{self.mode}/{sorted(self.layers)} "
                f"with {other.site}/{other.mode}/{sorted(other.layers)}."
            )
        if self.architecture_id and other.architecture_id and self.architecture_id != other.architecture_id:
            raise ValueError("Cannot merge statistics probed on different models.")
        return SiteStatistics(
            self.site,
            self.mode,
            {i: s.merge(other.layers[i]) for i, s in self.layers.items()},
            self.architecture_id or other.architecture_id,
        )

    @property
    def count(self) -> int:
        """Number of vectors counted per layer: identical for every dense layer; a routed expert's site counts only
        the tokens routed to it, so this is the largest count (per-layer counts: ``layers[i].count``)."""
        return max((s.count for s in self.layers.values()), default=0)


def merge(*results: SiteStatistics) -> SiteStatistics:
    """Merge several probe results (``merge(probe(a), probe(b)) == probe(a + b)``)."""
    if not results:
        raise ValueError("merge() needs at least one result.")
    out = results[0]
    for r in results[1:]:
        out = out.merge(r)
    return out
