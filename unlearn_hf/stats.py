"""Mergeable running statistics (count, mean, M2, mean |x|, min, max) in float64.

Batches are combined with Chan et al.'s parallel formula, so two partial results merge exactly (up to float64
rounding): probing can be resumed, extended with more data, or split across processes and all-reduced.
Memory is O(layers × d_ff), never O(tokens).

Device: the sums are kept on the activations' device in float64, with no copy to the host per batch (a copy
would wait for the device); :meth:`RunningStats.to_` moves them at the end. A device without float64
(Apple MPS) accumulates on the host instead: its activations are copied there, batch by batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import stats_chunks as chunks
from .model_identity import same_model

#: Pending sums are folded into the statistics after this many vectors (bounds the cancellation of Σx² − n·mean²).
_FOLD_ROWS = 1 << 16

#: What :class:`RunningStats` can keep besides the count (``statistics`` of the probe: the first two).
QUANTITIES = ("moments", "abs", "extremes")

#: What a probe accumulates by default besides the count (see :class:`~unlearn_hf.stats.RunningStats`).
DEFAULT_STATISTICS = ("moments", "abs")


def check_statistics(statistics: Sequence[str]) -> tuple[str, ...]:
    """``statistics`` as a tuple in canonical order; raises ``ValueError`` when it is empty or names an unknown one."""
    chosen = (statistics,) if isinstance(statistics, str) else tuple(statistics)
    unknown = [q for q in chosen if q not in DEFAULT_STATISTICS]
    if unknown or not chosen:
        raise ValueError(
            f"statistics must name one or more of {list(DEFAULT_STATISTICS)}, got {statistics!r}"
            + (" (min/max: track_extremes)." if "extremes" in unknown else ".")
        )
    return tuple(q for q in DEFAULT_STATISTICS if q in chosen)


#: Device types without float64 arithmetic: their activations are accumulated on the host.
NO_FLOAT64 = frozenset({"mps"})


def accumulation_device(device: torch.device | str) -> torch.device:
    """Where float64 statistics of activations on ``device`` are accumulated: there, or on the host."""
    device = torch.device(device)
    return torch.device("cpu") if device.type in NO_FLOAT64 else device


class RunningStats:
    """Per-dimension running statistics of a stream of vectors of width ``dim``.

    :meth:`update` only adds to float64 sums (of x, |x| and x²) and a count; they are folded into
    ``count``/``mean``/``m2``/``abs_sum`` (Chan's formula) when one of them is read, and every
    :data:`_FOLD_ROWS` vectors, so a probe pays a few matrix-vector products per batch and no per-batch merge.
    Folding M2 = Σx² − n·mean² over n vectors can lose up to about ``n·eps·(1 + mean²/var)`` of M2 (float64
    eps; n ≤ :data:`_FOLD_ROWS`, so the bound does not grow with the stream).

    Attributes:
        count: number of vectors seen.
        mean: running mean, float64 ``[dim]``.
        m2: sum of squared deviations from the mean, float64 ``[dim]``.
        abs_sum: sum of ``|x|``, float64 ``[dim]``.
        minimum / maximum: per-dimension extremes (``None`` unless ``track_extremes``).
    """

    def __init__(
        self,
        dim: int,
        track_extremes: bool = False,
        count: int = 0,
        mean: torch.Tensor | None = None,
        m2: torch.Tensor | None = None,
        abs_sum: torch.Tensor | None = None,
        minimum: torch.Tensor | None = None,
        maximum: torch.Tensor | None = None,
        *,
        track_moments: bool = True,
        track_abs: bool = True,
    ) -> None:
        zeros = lambda: torch.zeros(dim, dtype=torch.float64)  # noqa: E731
        self.dim, self.track_extremes = dim, track_extremes
        self.track_moments, self.track_abs = track_moments, track_abs
        self._count = count
        self._mean = (zeros() if mean is None else mean) if track_moments else None
        self._m2 = (zeros() if m2 is None else m2) if track_moments else None
        self._abs_sum = (zeros() if abs_sum is None else abs_sum) if track_abs else None
        self.minimum, self.maximum = minimum, maximum
        if track_extremes and minimum is None:
            self.minimum = torch.full((dim,), float("inf"), dtype=torch.float64)
            self.maximum = torch.full((dim,), float("-inf"), dtype=torch.float64)
        # pending sums over the vectors not folded in yet: rows of one block, Σx and Σx² (moments) then Σ|x|
        self._rows = 2 * track_moments + track_abs
        self._sums: torch.Tensor | None = None
        self._pending = 0

    @classmethod
    def tracking(cls, dim: int, quantities: Sequence[str], **values) -> RunningStats:
        """Statistics of width ``dim`` that keep ``quantities`` (of :data:`QUANTITIES`); ``values``: the
        constructor's count and tensors."""
        unknown = sorted(set(quantities) - set(QUANTITIES))
        if unknown:
            raise ValueError(f"Unknown statistics {unknown}; choose among {list(QUANTITIES)}.")
        return cls(
            dim,
            "extremes" in quantities,
            track_moments="moments" in quantities,
            track_abs="abs" in quantities,
            **values,
        )

    def __repr__(self) -> str:
        return f"RunningStats(dim={self.dim}, count={self.count}, quantities={self.quantities})"

    @property
    def count(self) -> int:
        return self._count + self._pending

    @property
    def mean(self) -> torch.Tensor:
        self._require("moments", self.track_moments)
        self._fold()
        return self._mean

    @property
    def m2(self) -> torch.Tensor:
        self._require("moments", self.track_moments)
        self._fold()
        return self._m2

    @property
    def abs_sum(self) -> torch.Tensor:
        self._require("abs", self.track_abs)
        self._fold()
        return self._abs_sum

    @property
    def quantities(self) -> tuple[str, ...]:
        """What is kept besides the count: ``"moments"`` (mean, M2), ``"abs"`` (sum of |x|), ``"extremes"``."""
        flags = (self.track_moments, self.track_abs, self.track_extremes)
        return tuple(q for q, on in zip(QUANTITIES, flags) if on)

    @staticmethod
    def _require(quantity: str, tracked: bool) -> None:
        if not tracked:
            raise ValueError(
                f"These statistics were collected without {quantity!r} (the probe's `statistics` did not "
                f"include it); probe again with statistics containing {quantity!r}."
            )

    def update(self, x: torch.Tensor, exclude: torch.Tensor | None = None) -> None:
        """Add a batch of vectors ``x`` of shape ``[n, dim]`` (any dtype/device).

        ``exclude``: rows of ``x`` to leave out (sorted distinct indices, a host tensor; not with extremes). They are
        zeroed in the float64 copy: when few rows are left out (a batch's padding), this saves gathering the others,
        a pass over the activations."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Expected activations of shape [n, {self.dim}], got {tuple(x.shape)}.")
        if exclude is not None and self.track_extremes:
            raise ValueError("Rows cannot be excluded by zeroing when extremes are kept: select the others.")
        n = x.shape[0] - (0 if exclude is None else exclude.numel())
        if n == 0:
            return
        x = x.detach()
        device = accumulation_device(x.device)
        if x.device != device:
            x = x.to(device)
        if self._sums is None or self._sums.device != x.device:
            self._fold()
            self._sums = torch.zeros(self._rows, self.dim, dtype=torch.float64, device=x.device)
        if self._rows:
            chunks.add_column_sums(
                self._sums.view(1, -1),
                x,
                moments=self.track_moments,
                absolute=self.track_abs,
                exclude=exclude,
            )
        self._pending += n
        if self._pending >= _FOLD_ROWS:
            self._fold()
        if self.track_extremes:
            low, high = x.amin(0).to(torch.float64), x.amax(0).to(torch.float64)
            self.minimum = torch.minimum(self.minimum.to(low.device), low)
            self.maximum = torch.maximum(self.maximum.to(high.device), high)

    def _fold(self) -> None:
        """Merge the pending sums into count/mean/M2/sum |x| (Chan's formula) and clear them."""
        if not self._pending:
            return
        n = self._pending
        sums = self._sums.unbind(0)
        mean_b = m2_b = None
        if self.track_moments:
            total, sumsq = sums[0], sums[1]
            mean_b = total / n
            m2_b = (sumsq - mean_b * total).clamp_min_(0)
        device, self._sums, self._pending = self._sums.device, None, 0
        self._move(device)
        self._merge_parts(n, mean_b, m2_b, sums[-1] if self.track_abs else None)

    def _move(self, device: torch.device | str) -> None:
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        self._mean, self._m2, self._abs_sum = to(self._mean), to(self._m2), to(self._abs_sum)
        self.minimum, self.maximum = to(self.minimum), to(self.maximum)

    def to_(self, device: torch.device | str) -> RunningStats:
        """Move the statistics to ``device`` in place and return ``self``."""
        self._fold()
        self._move(device)
        return self

    def merge_(self, other: RunningStats) -> RunningStats:
        """Merge ``other`` into ``self`` in place (Chan's formula) and return ``self``. ``other`` must keep every
        quantity ``self`` keeps (what only ``other`` keeps is not taken over)."""
        if other.dim != self.dim or other.track_extremes != self.track_extremes:
            raise ValueError("Cannot merge statistics of different widths or kinds.")
        missing = [q for q in self.quantities if q not in other.quantities]
        if missing:
            raise ValueError(f"Cannot merge statistics without {missing} into statistics that keep them.")
        if other.count == 0:
            return self
        self._fold()
        self._merge_parts(
            other.count,
            other.mean if self.track_moments else None,
            other.m2 if self.track_moments else None,
            other.abs_sum if self.track_abs else None,
        )
        if self.track_extremes:
            self.minimum = torch.minimum(self.minimum.to(other.minimum.device), other.minimum)
            self.maximum = torch.maximum(self.maximum.to(other.maximum.device), other.maximum)
        return self

    def _merge_parts(
        self, n_b: int, mean_b: torch.Tensor | None, m2_b: torch.Tensor | None, abs_b: torch.Tensor | None
    ) -> None:
        """Chan's formula: fold (count n_b, mean, M2, sum |x|; ``None`` where not kept) into the folded
        statistics."""
        n_a = self._count
        n = n_a + n_b
        if self.track_moments:
            if n_a == 0:
                self._mean, self._m2 = mean_b.clone(), m2_b.clone()
            else:
                delta = mean_b - self._mean
                self._mean = self._mean + delta * (n_b / n)
                self._m2 = self._m2 + m2_b + delta.square() * (n_a * n_b / n)
        if self.track_abs:
            self._abs_sum = abs_b.clone() if n_a == 0 else self._abs_sum + abs_b
        self._count = n

    def is_finite(self) -> bool:
        """Whether every kept quantity is finite (an activation that was NaN or ±inf makes its sums so)."""
        kept = (self.mean, self.m2) if self.track_moments else ()
        kept += (self.abs_sum,) if self.track_abs else ()
        kept += (self.minimum, self.maximum) if self.track_extremes else ()
        return all(bool(torch.isfinite(t).all()) for t in kept)

    def merge(self, other: RunningStats) -> RunningStats:
        """Return a new object holding the statistics of both ``self`` and ``other``."""
        return self.copy().merge_(other)

    def copy(self) -> RunningStats:
        out = RunningStats(
            self.dim, self.track_extremes, track_moments=self.track_moments, track_abs=self.track_abs
        )
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
        architecture_id: short id of the probed model and its weights (:func:`~unlearn_hf.model_identity.architecture_id`),
            used to refuse merging or fitting with statistics of another model.
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
        if not same_model(self.architecture_id, other.architecture_id):
            raise ValueError(
                "Cannot merge statistics probed on different models (or other weights of one model)."
            )
        return SiteStatistics(
            self.site,
            self.mode,
            {i: s.merge(other.layers[i]) for i, s in self.layers.items()},
            self.architecture_id or other.architecture_id,
        )

    def nonfinite_layers(self) -> list[int]:
        """The layers whose statistics hold NaN or ±inf (see :meth:`RunningStats.is_finite`)."""
        return [i for i, s in sorted(self.layers.items()) if s.count and not s.is_finite()]

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


def check_finite(stats: SiteStatistics, source: str) -> None:
    """Refuse statistics with NaN or ±inf values: ``source`` produced non-finite activations at their site.

    Raises:
        ValueError: naming the site and the layers.
    """
    bad = stats.nonfinite_layers()
    if bad:
        raise ValueError(
            f"{source} produced NaN or inf activations at the {stats.site} site of layers {bad}: statistics of them "
            "are meaningless. Usual causes: float16 overflow (use bfloat16 or float32), an attention implementation "
            "that gives padded rows NaN (try attn_implementation='sdpa', or fewer padded rows per batch), or weights "
            "that are not finite."
        )
