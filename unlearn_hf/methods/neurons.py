"""Shared by the neuron-level methods (Neuron Adjust, Selective Pruning): paired probing and global selection."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import torch

from ..data import DataSpec
from ..probe import model_fingerprint, probe
from ..sites import FFLSite
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


def _check_precomputed(
    data: SiteStatistics, model, *, role: str, site: str, mode: str, layers: list[int], sites
) -> None:
    problems = []
    if data.site != site:
        problems.append(f"site {data.site!r} != {site!r}")
    if data.mode != mode:
        problems.append(f"token mode {data.mode!r} != {mode!r}")
    if sorted(data.layers) != sorted(layers):
        problems.append(f"layers {sorted(data.layers)} != {sorted(layers)}")
    if data.model_fingerprint and data.model_fingerprint != model_fingerprint(model):
        problems.append("they were probed on a different model")
    if sites is not None and not problems:
        by_layer = {s.layer: s for s in sites}
        for i in sorted(data.layers):
            dim = data.layers[i].dim
            if i in by_layer and dim != by_layer[i].d_ff:
                problems.append(f"layer {i} has width {dim}, the model's FFL has {by_layer[i].d_ff}")
    if not problems and data.count == 0:
        problems.append("they hold no values")
    if problems:
        raise ValueError(f"Precomputed {role} statistics do not fit: " + "; ".join(problems) + ".")


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
    sites: Sequence[FFLSite] | None = None,
) -> SiteStatistics:
    """Probe ``data`` at ``site``, or validate precomputed :class:`SiteStatistics` given in its place.

    Args:
        model: the unlearned model being fitted. It is probed as it runs, with the methods already attached
            active, so a method fitted after others (e.g. KSD after Neuron Adjust) sees the activations the
            others produce; with nothing attached this is exactly the base model.
        data: anything :func:`unlearn_hf.probe.probe` accepts, or precomputed statistics.
        role: ``"forget"`` / ``"retain"``, for messages.
        site / mode / layers: where and which tokens to probe (precomputed statistics must match them).
        spec / show_progress: passed to the probe.
        sites: the model's FFL sites (e.g. the wrapper's, honouring a site override); also used to check the
            width of precomputed statistics. Default: found on ``model``.

    Raises:
        ValueError: ``data`` is ``None`` or empty, or precomputed statistics belong to another site, token mode,
            layer set or model.
    """
    if data is None:
        raise ValueError(f"This method needs {role} data (got None).")
    if isinstance(data, SiteStatistics):
        _check_precomputed(data, model, role=role, site=site, mode=mode, layers=layers, sites=sites)
        return data
    return probe(
        model,
        data,
        tokenizer,
        site=site,
        mode=mode,
        layers=layers,
        sites=sites,
        spec=spec,
        show_progress=show_progress,
        desc=f"probing {role}",
    )


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


def check_layer_list(layers: Any) -> list[int] | None:
    """Normalise a config's ``layers`` (``None``, an int or a list of ints) to ``None`` or a non-empty list."""
    if layers is None:
        return None
    if isinstance(layers, int) and not isinstance(layers, bool):
        return [layers]
    try:
        out = list(layers)
    except TypeError:
        raise ValueError(f"layers must be None, an int or a list of ints, got {layers!r}.") from None
    try:
        if not out or any(isinstance(i, bool) for i in out):
            raise TypeError
        return [operator.index(i) for i in out]
    except TypeError:
        raise ValueError(f"layers must be None or a non-empty list of ints, got {layers!r}.") from None
