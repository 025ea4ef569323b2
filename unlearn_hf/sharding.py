"""Sharding data over the ranks of a distributed fit: which batches a rank probes, and a fingerprint of the whole
data that the ranks compare (each rank must be given the same full data: it picks its own shard)."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


def owns_batch(index: int, rank: int, world_size: int) -> bool:
    """Whether batch ``index`` is rank ``rank``'s: batch ``i`` goes to rank ``i % world_size``. The one statement of
    the rule that every pass split between the ranks follows (probes, held-out scoring, KSD calibration)."""
    return index % world_size == rank


def shard_batch_indices(n_batches: int, rank: int, world_size: int) -> list[int]:
    """Indices of the batches that ``rank`` probes out of ``n_batches`` (:func:`owns_batch`)."""
    check_shard((rank, world_size))
    return [i for i in range(n_batches) if owns_batch(i, rank, world_size)]


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """Validate a ``(rank, world_size)`` pair."""
    try:
        rank, world_size = (int(v) for v in shard)
    except (TypeError, ValueError) as err:
        raise ValueError(f"shard must be a (rank, world_size) pair of integers, got {shard!r}.") from err
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"Invalid shard (rank {rank}, world_size {world_size}): need 0 <= rank < world_size."
        )
    return rank, world_size


def fingerprint_rows(rows: Iterable[Sequence[int]]) -> int:
    """A 62-bit hash of token rows, in order (the data before sharding: ranks given other texts, fewer of them or
    the same in another order disagree)."""
    h = hashlib.sha1()
    for ids in rows:
        h.update(len(ids).to_bytes(8, "little"))
        h.update(array("q", ids).tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 2


class ShardBatches(Iterator):
    """This rank's batches, with the :func:`fingerprint_rows` of the whole data (0: unknown, e.g. a generator)."""

    def __init__(self, batches: Iterator[Any], fingerprint: int) -> None:
        self._batches, self.fingerprint = batches, fingerprint

    def __next__(self) -> Any:
        return next(self._batches)
