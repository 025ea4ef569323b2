"""Neuron Adjust's random draws: per request, a generator per device, and per forward one block of thresholds
for all the layers of a device (see :class:`~unlearn_hf.methods.neuron_adjust.NeuronAdjust`)."""

from __future__ import annotations

import torch

from ...context import ForwardContext
from .layer import NeuronAdjustLayer, thresholds_from_uniforms, uses_full_width


class LayerGroup:
    """The layers of one device, which share one block of thresholds per forward: each layer's selected
    neurons side by side (layers in increasing order, state order within a layer), and where they go in the
    full-width layout (the layers' widths side by side)."""

    def __init__(self, layers: dict[int, NeuronAdjustLayer]) -> None:
        self.layers = sorted(layers)
        self.counts = [layers[i].num_neurons for i in self.layers]
        self.widths = [layers[i].width for i in self.layers]
        offsets = torch.tensor([0, *self.widths[:-1]]).cumsum(0).tolist()
        self._positions_cpu = torch.cat([layers[i]._neurons_cpu + o for i, o in zip(self.layers, offsets)])
        self._positions: dict[torch.device, torch.Tensor] = {}

    def positions(self, device: torch.device) -> torch.Tensor:
        if device not in self._positions:
            self._positions[device] = self._positions_cpu.to(device)
        return self._positions[device]


class Draws:
    """The random state of one attachment within one request: a generator per device (seeded at the request's
    first draw there), and the thresholds of the current forward, one view per layer.

    The thresholds live in buffers kept for the request, one per group and leading shape: each forward of a
    decoding loop refills them in place (``torch.rand(out=...)``, then ``logit_``, ``clamp_min_`` and, for the
    full-width layout, one ``index_copy_`` into zeros that stay zeros), so the per-layer views are made once.
    """

    __slots__ = ("generators", "forward", "lead", "views", "buffers", "full")

    def __init__(self) -> None:
        self.generators: dict[torch.device, torch.Generator] = {}
        self.forward: ForwardContext | None = None
        self.lead: torch.Size | None = None
        self.views: dict[int, torch.Tensor] = {}
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, dict[int, torch.Tensor]]] = {}
        self.full = False

    def draw(self, output: torch.Tensor, group: LayerGroup, dtype: torch.dtype, seed) -> None:
        """Draw ``u = torch.rand((*output.shape[:-1], K))`` for the K selected neurons of ``group`` on
        ``output``'s device and store ``max(0, logit(u))`` per layer, in the layout of the layers' path
        (full-width views with zeros at unselected columns for small calls, see ``uses_full_width``)."""
        device = output.device
        gen = self.generators.get(device)
        if gen is None:
            gen = self.generators[device] = torch.Generator(device=device)
            gen.manual_seed(seed())
        lead = output.shape[:-1]
        full = self.full = None not in group.widths and uses_full_width(output, group.widths)
        key = (id(group), lead, device, dtype, full)
        cached = self.buffers.get(key)
        if cached is None:
            thresholds = torch.empty((*lead, sum(group.counts)), dtype=dtype, device=device)
            if full:
                wide = torch.zeros((*lead, sum(group.widths)), dtype=dtype, device=device)
                views = dict(zip(group.layers, wide.split(group.widths, -1)))
            else:
                wide, views = None, dict(zip(group.layers, thresholds.split(group.counts, -1)))
            cached = self.buffers[key] = (thresholds, wide, views)
        thresholds, wide, views = cached
        thresholds_from_uniforms(torch.rand(thresholds.shape, generator=gen, out=thresholds))
        if wide is not None:
            wide.index_copy_(-1, group.positions(device), thresholds)
        self.views.update(views)
