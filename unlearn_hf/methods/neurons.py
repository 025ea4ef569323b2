"""Shared by the neuron-level methods (Neuron Adjust, Selective Pruning): paired probing and global selection."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..data import DataSpec
from ..probe import model_fingerprint, probe
from ..stats import SiteStatistics

NEURON_TOKEN_MODES = ("all", "prompt", "completion")


def check_tokenizer(model, tokenizer: Any) -> None:
    """Refuse a tokenizer whose vocabulary does not fit the model's embedding table."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}: "
            "they do not belong together."
        )


def probe_or_check(
    model,
    data: Any,
    tokenizer: Any,
    *,
    role: str,
    site: str,
    mode: str,
    layers: list[int],
    spec: DataSpec,
    show_progress: bool,
) -> SiteStatistics:
    """Probe ``data`` at ``site``, or validate precomputed :class:`SiteStatistics` given in its place."""
    if data is None:
        raise ValueError(f"This method needs {role} data (got None).")
    if isinstance(data, SiteStatistics):
        problems = []
        if data.site != site:
            problems.append(f"site {data.site!r} != {site!r}")
        if data.mode != mode:
            problems.append(f"token mode {data.mode!r} != {mode!r}")
        if sorted(data.layers) != sorted(layers):
            problems.append(f"layers {sorted(data.layers)} != {sorted(layers)}")
        if data.model_fingerprint and data.model_fingerprint != model_fingerprint(model):
            problems.append("they were probed on a different model")
        if problems:
            raise ValueError(f"Precomputed {role} statistics do not fit: " + "; ".join(problems) + ".")
        return data
    return probe(
        model,
        data,
        tokenizer,
        site=site,
        mode=mode,
        layers=layers,
        spec=spec,
        show_progress=show_progress,
        desc=f"probing {role}",
    )


def selection_size(ratio: float, total: int) -> int:
    """Number of neurons selected: ``round(ratio * total)`` (halves round up), at least 1."""
    return max(1, min(total, math.floor(ratio * total + 0.5)))


def select_global(
    scores: dict[int, torch.Tensor], ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``ratio`` neurons of all layers together, highest score first.

    Ties are broken by layer, then neuron index (lower first), so the selection is deterministic.

    Returns:
        ``(layer_index, neuron_index, score)`` of the selected neurons (int64, int64, float64).
    """
    layers = sorted(scores)
    flat = torch.cat([scores[i].to(torch.float64).flatten() for i in layers])
    if torch.isnan(flat).any():
        raise ValueError("Neuron scores contain NaN.")
    layer_of = torch.cat([torch.full((scores[i].numel(),), i, dtype=torch.int64) for i in layers])
    neuron_of = torch.cat([torch.arange(scores[i].numel(), dtype=torch.int64) for i in layers])
    k = selection_size(ratio, flat.numel())
    order = torch.sort(-flat, stable=True).indices[:k]
    return layer_of[order], neuron_of[order], flat[order]


def split_by_layer(layer_index: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{layer: positions in the flat selection}`` for the layers that have selected neurons."""
    return {int(i): (layer_index == i).nonzero().squeeze(1) for i in torch.unique(layer_index)}
