"""Sharding data over the ranks of a distributed fit: which batches a rank probes, and a fingerprint of the whole
data that the ranks compare (each rank must be given the same full data: it picks its own shard)."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch


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
    """This rank's batches, with the :func:`fingerprint_rows` of the whole data (an int, or a function giving it
    once the batches are exhausted: :class:`StreamShard`)."""

    def __init__(self, batches: Iterator[Any], fingerprint: int | Callable[[], int]) -> None:
        self._batches, self._fingerprint = batches, fingerprint

    def __next__(self) -> Any:
        return next(self._batches)

    @property
    def fingerprint(self) -> int:
        return self._fingerprint() if callable(self._fingerprint) else self._fingerprint


class StreamShard(Iterator):
    """Rank ``rank``'s ``(index, batch)`` pairs of a stream of tokenized batches (a generator, a ``DataLoader``),
    hashing the ``input_ids`` of every batch of the stream as it passes, this rank's or not: :meth:`fingerprint`
    is the whole stream's once it is exhausted. A stream that is already one rank's share (a ``DistributedSampler``,
    a per-rank generator) then disagrees with the other ranks' instead of being sharded a second time unseen."""

    def __init__(self, indexed: Iterable[tuple[int, Any]], rank: int, world_size: int) -> None:
        self._indexed, self._rank, self._world_size = iter(indexed), rank, world_size
        self._hash = hashlib.sha1()

    def __next__(self) -> tuple[int, Any]:
        for i, batch in self._indexed:
            ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
            if torch.is_tensor(ids):
                self._hash.update(repr((tuple(ids.shape), str(ids.dtype))).encode())
                self._hash.update(ids.detach().cpu().contiguous().numpy().tobytes())
            else:  # refused by the reader of the batches, on every rank
                self._hash.update(type(batch).__name__.encode())
            if owns_batch(i, self._rank, self._world_size):
                return i, batch
        raise StopIteration

    def fingerprint(self) -> int:
        return int.from_bytes(self._hash.digest()[:8], "little") >> 2
