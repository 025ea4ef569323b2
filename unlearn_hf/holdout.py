"""The held-out split of a fit's examples (``ratio="auto"``'s scoring, Key Space Detection's calibration): seeded,
disjoint, and copies of one example never on both sides."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch


def example_key(example: Any) -> str:
    """What makes two examples the same: a text (stripped), a record's fields, a chat message list without its own
    system turn (one user message is the same question as its text: their bare and chat renderings are the same)."""
    if isinstance(example, str):
        return example.strip()
    if isinstance(example, Mapping):
        return json.dumps(dict(example), sort_keys=True, default=str)
    if isinstance(example, Sequence) and example and all(isinstance(m, Mapping) for m in example):
        # its own system turn aside: Key Space Detection renders such a list without it too
        turns = list(example[1:] if example[0].get("role") == "system" else example)
        if len(turns) == 1 and turns[0].get("role") == "user" and isinstance(turns[0].get("content"), str):
            return turns[0]["content"].strip()
        return json.dumps([dict(m) for m in turns], sort_keys=True, default=str)
    return repr(example)


def holdout_split(keys: Sequence[str], fraction: float, too_few: str) -> tuple[list[int], list[int]]:
    """Deterministic ``(fit, held-out)`` indices of examples with the given :func:`example_key` ``keys``: distinct
    examples are taken in a permutation seeded with 0 (the same in every run and process), each with all its copies,
    while they fit in ``round(fraction * n)`` rows (at least one example), so a held-out example was never fitted
    on (without copies: the permutation's first rows). Each part keeps its original order.

    Raises:
        ValueError: fewer than 2 rows would remain to fit on; the message is ``too_few`` formatted with ``n`` and
            ``n_held``.
    """
    first: dict[str, int] = {}
    group = [first.setdefault(k, len(first)) for k in keys]
    n, n_held, sizes = len(group), max(1, round(fraction * len(group))), Counter(group)
    order = torch.randperm(len(first), generator=torch.Generator().manual_seed(0)).tolist()
    held, count = set(), 0
    for g in order:  # examples whose copies fit in what is left to hold out
        if count + sizes[g] <= n_held:
            held.add(g)
            count += sizes[g]
    if not held:  # every example has more copies than that: the one with the fewest
        g = min(order, key=lambda g: sizes[g])
        held, count = {g}, sizes[g]
    if n - count < 2:
        raise ValueError(too_few.format(n=n, n_held=n_held))
    return [i for i in range(n) if group[i] not in held], [i for i in range(n) if group[i] in held]


def repeated(keys: Sequence[str]) -> int:
    """How many examples repeat an earlier one."""
    return sum(c - 1 for c in Counter(keys).values())
