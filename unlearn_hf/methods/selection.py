"""Global neuron selection shared by the neuron-level methods (Neuron Adjust, Selective Pruning): the top
``ratio`` of all neurons of all layers, and checks that a saved selection fits a model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..sites import FFLSite


def selection_size(ratio: float, total: int) -> int:
    """Number of neurons selected out of ``total``: ``round(ratio * total)`` with halves rounded up, clipped to
    ``[1, total]`` (a positive ratio always selects at least one neuron)."""
    if total < 1:
        raise ValueError(f"There are no neurons to select from (total={total}).")
    return max(1, min(total, math.floor(ratio * total + 0.5)))


def select_global(
    scores: dict[int, torch.Tensor], ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``ratio`` neurons of all layers together, highest score first.

    The selection holds :func:`selection_size` ``(ratio, all neurons)`` neurons. Ties are broken by layer, then
    neuron index (lower first), so the selection is deterministic: it equals Python's
    ``sorted(neurons, key=lambda n: (-score, layer, neuron))[:k]``.

    Returns:
        ``(layer_index, neuron_index, score)`` of the selected neurons (int64, int64, float64).

    Raises:
        ValueError: a score is NaN, or there are no neurons.
    """
    layers = sorted(scores)
    if not layers:
        raise ValueError("No layers to select neurons from.")
    flat = torch.cat([scores[i].detach().cpu().to(torch.float64).flatten() for i in layers])
    if torch.isnan(flat).any():
        bad = [i for i in layers if torch.isnan(scores[i]).any()]
        raise ValueError(f"Neuron scores contain NaN (layers {bad}).")
    layer_of = torch.cat([torch.full((scores[i].numel(),), i, dtype=torch.int64) for i in layers])
    neuron_of = torch.cat([torch.arange(scores[i].numel(), dtype=torch.int64) for i in layers])
    k = selection_size(ratio, flat.numel())
    order = torch.sort(-flat, stable=True).indices[:k]
    return layer_of[order], neuron_of[order], flat[order]


def split_by_layer(layer_index: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{layer: positions in the flat selection}`` for the layers that have selected neurons."""
    return {int(i): (layer_index == i).nonzero().squeeze(1) for i in torch.unique(layer_index)}


def check_selection(state: dict[str, torch.Tensor], sites: Sequence[FFLSite], method: str) -> None:
    """Refuse a fitted selection that does not fit the model's layers and widths, or names a neuron twice."""
    layers, neurons = state["layer_index"], state["neuron_index"]
    if layers.numel() == 0:
        raise ValueError(f"{method} state selects no neurons.")
    if int(layers.min()) < 0 or int(layers.max()) >= len(sites):
        raise ValueError(
            f"{method} state names layers {sorted(set(layers.tolist()))}; the model has {len(sites)} FFL layers."
        )
    for layer, pos in split_by_layer(layers).items():
        idx = neurons[pos]
        d_ff = sites[layer].d_ff
        if int(idx.min()) < 0 or int(idx.max()) >= d_ff:
            raise ValueError(f"{method} state: layer {layer} names neuron indices outside 0..{d_ff - 1}.")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"{method} state: layer {layer} names a neuron more than once.")
