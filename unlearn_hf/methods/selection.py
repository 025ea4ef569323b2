"""Global neuron selection shared by the neuron-level methods (Neuron Adjust, Selective Pruning): the top
``ratio`` of all neurons of all layers, checks that a saved selection fits a model, and their common base."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..data import DataSpec
from ..sites import FFLSite, require_pre_sites
from .base import UnlearningMethod
from .config import resolve_layers
from .ratio_search import fit_neuron_method

logger = logging.getLogger(__name__)


class NeuronSelectionMethod(UnlearningMethod):
    """A method that probes one site of its layers on forget and retain data and acts on selected neurons of
    that same site (:attr:`site`: ``"pre"`` or ``"key"``), from the per-neuron :attr:`statistics` it reads."""

    site: ClassVar[str]

    @classmethod
    def fit(cls, model, config, forget, retain=None, tokenizer=None, *, spec: DataSpec, show_progress=True):
        """Probe :attr:`site` of the chosen layers on ``forget`` and ``retain`` (text, tokenized batches or
        precomputed :class:`~unlearn_hf.stats.SiteStatistics`) and select the neurons at ``config.ratio``, or
        search the ratio (``ratio="auto"``, :mod:`unlearn_hf.methods.ratio_search`).

        Raises:
            ValueError: missing/empty data, a set with fewer than 2 probed tokens, a tokenizer or statistics that
                do not belong to the model, token ids outside its vocabulary.
            SiteError: the method reads the pre-activation site, which (some of) its layers lack.
        """
        if cls.site == "pre":
            sites = model.ffl_sites
            wanted = resolve_layers(config.layers, len(sites))
            require_pre_sites([sites[i] for i in wanted], cls.__name__)
        return fit_neuron_method(
            cls,
            model,
            config,
            forget,
            retain,
            tokenizer,
            site=cls.site,
            statistics=cls.statistics,
            spec=spec,
            show_progress=show_progress,
        )

    @classmethod
    def probe_sites(cls, config, n_layers):
        return {cls.site: resolve_layers(config.layers, n_layers)}

    @classmethod
    def changed_sites(cls, config, n_layers):
        return {cls.site: resolve_layers(config.layers, n_layers)}


def scorable_layers(
    layers: Sequence[int], stats_f: Any, stats_r: Any, minimum: int, method: str
) -> list[int]:
    """The ``layers`` whose forget and retain statistics each counted at least ``minimum`` tokens. A routed
    expert's site counts only the tokens routed to it, so some may have too few to be scored: they are left out
    of the selection (logged). Dense layers all count every token.

    Raises:
        ValueError: no layer has enough tokens.
    """
    kept = [i for i in layers if min(stats_f.layers[i].count, stats_r.layers[i].count) >= minimum]
    if not kept:
        raise ValueError(
            f"{method}: no layer saw {minimum} or more forget and retain tokens (got at most "
            f"{stats_f.count} forget and {stats_r.count} retain): give more data."
        )
    if len(kept) < len(layers):
        logger.info(
            "%s: %d of %d sites (experts that the router sent fewer than %d forget or retain tokens) cannot be "
            "scored and are not selected.",
            method,
            len(layers) - len(kept),
            len(layers),
            minimum,
        )
    return kept


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
