"""Token-budget batching: which examples share a forward pass.

Every probe of a fit (Neuron Adjust, Selective Pruning, Key Space Detection and its calibration, the held-out
scoring of ``ratio="auto"``) reads its examples in batches planned here. The examples are sorted by length,
longest first (the largest batch comes first, so an out-of-memory error shows at once), and cut greedily into
batches of at most ``max_batch_tokens`` padded tokens (rows × the longest row) and at most ``batch_size``
rows. Sorting keeps the padding small: a batch holds examples of about one length, where batches in reading
order pad every text to the longest of its batch. An example longer than the budget gets a batch of its own.

The statistics do not depend on the plan: they are mergeable float64 sums (:mod:`unlearn_hf.stats`), so any
order and any cut give the same result up to float64 rounding of the merges and the float32 rounding of the
activations themselves (a matrix product's blocking may depend on the batch's shape).

Distributed probing plans the batches of *all* the data on every rank (tokenizing is cheap beside a forward)
and gives batch ``i`` to rank ``i % world_size``, so each example is probed in exactly the batch it would have
been in on one process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

#: Default ``max_batch_tokens`` per device type (padded tokens per forward); other devices use ``"default"``.
#: On a CPU a forward's throughput stops growing at about a thousand tokens (SmolLM2-135M, 2 cores: 1024 and
#: 4096 tokens per forward ran equally fast over the same batches) while a larger budget mixes more lengths in a
#: batch and pads more (``benchmarks/fit_speed.py``); an accelerator needs larger batches to fill.
DEFAULT_BATCH_TOKENS = {"cpu": 1024, "default": 16384}


def default_batch_tokens(device: torch.device | str | None) -> int:
    """The default token budget of a forward on ``device`` (see :data:`DEFAULT_BATCH_TOKENS`)."""
    kind = torch.device(device).type if device is not None else "cpu"
    return DEFAULT_BATCH_TOKENS.get(kind, DEFAULT_BATCH_TOKENS["default"])


def plan_batches(
    lengths: Sequence[int], *, max_batch_tokens: int, batch_size: int | None = None
) -> list[list[int]]:
    """Cut examples of the given token ``lengths`` into batches; returns each batch's example indices.

    Examples are taken longest first (ties in their original order); a batch grows while ``rows × longest`` stays
    within ``max_batch_tokens`` and ``rows`` within ``batch_size`` (``None``: no limit on rows). Every index
    appears in exactly one batch; the plan depends only on the lengths, never on the text.

    Raises:
        ValueError: a budget or batch size below 1.
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            current = batches[-1]
            width = max(lengths[current[0]], 1)  # the longest row: the batch's first
            fits = (len(current) + 1) * width <= max_batch_tokens
            if fits and (batch_size is None or len(current) < batch_size):
                current.append(i)
                continue
        batches.append([i])
    return batches


class PaddingMeter:
    """Counts real and padded positions of the batches of one probe and logs the padding share at the end."""

    def __init__(self) -> None:
        self.batches = self.real = self.total = 0

    def add(self, attention_mask: torch.Tensor) -> None:
        self.batches += 1
        self.real += int(attention_mask.sum())
        self.total += attention_mask.numel()

    @property
    def fraction(self) -> float:
        return 0.0 if self.total == 0 else 1.0 - self.real / self.total

    def log(self, desc: str) -> None:
        logger.info(
            "%s: %d batches, %d tokens, %.1f%% padding", desc, self.batches, self.real, 100 * self.fraction
        )
