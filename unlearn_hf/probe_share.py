"""Probe passes shared by the fits of one ``fit([...])`` call (:mod:`unlearn_hf.methods.fit_many`): a probe over the
same tokens as an earlier one reuses its statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

from .stats import DEFAULT_STATISTICS, SiteStatistics, check_statistics


@dataclass
class ProbeShare:
    """Passes shared by the fits of one ``fit([...])`` call: each pass collects every site of ``sites``
    (``{kind: layers}``); a later probe over the same tokens (same token mode) that asks for a subset reuses it.

    Attributes:
        sites: what every pass collects. statistics: what it keeps of each site kind of ``sites`` (what the
            sharing methods read there).
        memo: pass results by (mode, extremes, experts' forward, token fingerprint). hits: reuses.
    """

    sites: dict[str, set[int]]
    statistics: dict[str, tuple[str, ...]] = field(default_factory=dict)
    memo: dict[tuple, tuple[dict[str, SiteStatistics], int]] = field(default_factory=dict)
    hits: int = 0

    def covers(self, layers: Sequence[int], statistics: Mapping[str, Sequence[str]]) -> bool:
        """Whether its passes serve a probe of ``layers`` keeping ``{kind: statistics}``."""
        return all(
            k in self.sites and set(layers) <= self.sites[k] and set(kept) <= set(self.statistics[k])
            for k, kept in statistics.items()
        )


_SHARE: ContextVar[ProbeShare | None] = ContextVar("unlearn_hf_probe_share", default=None)


@contextlib.contextmanager
def shared_passes(
    sites: Mapping[str, Iterable[int]], statistics: Mapping[str, Iterable[str]] | None = None
) -> Iterator[ProbeShare]:
    """Within the block, probes whose tokens match an earlier probe's share its pass (see :class:`ProbeShare`);
    ``statistics``: what to keep per site kind (default: every statistic). Only valid while nothing that changes
    the shared sites is attached in between: the caller checks that."""
    kinds = {k: set(v) for k, v in sites.items() if v}
    kept = {k: check_statistics(list((statistics or {}).get(k, DEFAULT_STATISTICS))) for k in kinds}
    share = ProbeShare(kinds, kept)
    token = _SHARE.set(share)
    try:
        yield share
    finally:
        _SHARE.reset(token)
