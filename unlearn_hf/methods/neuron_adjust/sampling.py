"""Neuron Adjust's random draws: per request, a generator per device; per forward, the thresholds of each layer,
drawn for all the layers of a device in one block when the forward is small (decoding) and layer by layer when it
is large (prefill), so memory stays O(one layer) (see :class:`~unlearn_hf.methods.neuron_adjust.NeuronAdjust`)."""

from __future__ import annotations

import torch

from ...context import ForwardContext
from .layer import NeuronAdjustLayer, compute_dtype, thresholds_from_uniforms, uses_full_width

#: A forward whose thresholds for all the layers of a device hold at most this many values draws them in one block
#: (a decoding step: fewer small operations per layer); a larger one draws each layer's at its hook, into one
#: scratch buffer reused by every layer (a prefill of 8 x 2048 tokens at ratio 0.03 on Llama-3-8B would otherwise
#: hold 860 MiB for the whole forward). The choice depends only on the shape, so the same input gives the same output.
GROUP_DRAW_MAX_NUMEL = 1 << 16


class LayerGroup:
    """The layers of one device, which share one generator: each layer's selected neurons side by side (layers in
    increasing order, state order within a layer), and where they go in the full-width layout (the layers' widths
    side by side)."""

    def __init__(self, layers: dict[int, NeuronAdjustLayer]) -> None:
        self.layers = sorted(layers)
        self.counts = [layers[i].num_neurons for i in self.layers]
        self.widths = [layers[i].width for i in self.layers]
        self.total = sum(self.counts)
        offsets = torch.tensor([0, *self.widths[:-1]]).cumsum(0).tolist()
        self._positions_cpu = torch.cat([layers[i]._neurons_cpu + o for i, o in zip(self.layers, offsets)])
        self._positions: dict[torch.device, torch.Tensor] = {}

    def positions(self, device: torch.device) -> torch.Tensor:
        if device not in self._positions:
            self._positions[device] = self._positions_cpu.to(device)
        return self._positions[device]


class Draws:
    """The random state of one attachment within one request: a generator per device (seeded at the request's
    first draw there) and the thresholds of the current forward.

    Small forwards (at most :data:`GROUP_DRAW_MAX_NUMEL` thresholds per device) draw ``u = torch.rand((*lead, K))``
    for the K selected neurons of all the layers of the device at the first of them, and keep one view per layer;
    larger ones draw ``u = torch.rand((*lead, K_layer))`` at each layer, in layer order, into a scratch buffer of
    the largest layer's size. Buffers are kept for the request while the leading shape stays the same (each step
    of a decoding loop refills them in place: ``torch.rand(out=...)``, ``logit_``, ``clamp_min_`` and, for the
    full-width layout, one ``index_copy_`` into zeros that stay zeros) and dropped when it changes, so a prefill's
    buffer is not held while decoding.
    """

    __slots__ = ("generators", "forward", "lead", "views", "buffers", "modes", "layer_states")

    def __init__(self) -> None:
        self.generators: dict[torch.device, torch.Generator] = {}
        self.forward: ForwardContext | None = None
        self.lead: torch.Size | None = None
        self.views: dict[int, torch.Tensor] = {}
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, dict[int, torch.Tensor]]] = {}
        self.modes: dict[int, tuple[bool, bool]] = {}
        self.layer_states: dict[int, torch.Tensor] = {}

    def start(self, ctx: ForwardContext, output: torch.Tensor) -> None:
        """A new forward (or a new leading shape within one): forget its views and modes, and drop buffers of other
        shapes; a new forward also forgets the generator states kept for recomputation (within one forward, a layer
        drawn before the shape changed, e.g. an expert's, keeps its state)."""
        lead = output.shape[:-1]
        if lead != self.lead:
            self.buffers = {}
        if ctx is not self.forward:
            self.layer_states = {}
        self.forward, self.lead, self.views, self.modes = ctx, lead, {}, {}

    def mode(self, output: torch.Tensor, group: LayerGroup) -> tuple[bool, bool]:
        """``(full, per_layer)`` of this forward for ``group``: whether its layers take the full-width path (decided
        by the widest, see ``uses_full_width``), and whether it draws layer by layer (more than
        :data:`GROUP_DRAW_MAX_NUMEL` thresholds for the group). Each device's group decides for itself."""
        mode = self.modes.get(id(group))
        if mode is None:
            full = None not in group.widths and uses_full_width(output, group.widths)
            per_layer = not full and output.shape[:-1].numel() * group.total > GROUP_DRAW_MAX_NUMEL
            mode = self.modes[id(group)] = (full, per_layer)
        return mode

    def _generator(self, device: torch.device, seed) -> torch.Generator:
        gen = self.generators.get(device)
        if gen is None:
            gen = self.generators[device] = torch.Generator(device=device)
            gen.manual_seed(seed())
        return gen

    def draw(self, output: torch.Tensor, group: LayerGroup, seed, full: bool) -> None:
        """Draw the thresholds ``max(0, logit(u))`` of every layer of ``group`` for ``output``'s leading shape in
        one block and store one view per layer, in the layout of the layers' path (``full``: full-width views with
        zeros at unselected columns, see ``uses_full_width``)."""
        device, lead = output.device, output.shape[:-1]
        gen = self._generator(device, seed)
        dtype = compute_dtype(output.dtype)
        key = (id(group), device, dtype, full)
        cached = self.buffers.get(key)
        if cached is None:
            thresholds = torch.empty((*lead, group.total), dtype=dtype, device=device)
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

    def _layer_generator(self, device: torch.device, layer: int, seed) -> torch.Generator:
        """The generator a layer draws from in this forward: the request's, its state before the layer's first
        draw kept, so that a recomputation of the layer (activation checkpointing) draws the same thresholds."""
        state = self.layer_states.get(layer)
        if state is None:
            gen = self._generator(device, seed)
            self.layer_states[layer] = gen.get_state()
            return gen
        gen = torch.Generator(device=device)
        gen.set_state(state)
        return gen

    def draw_routed(self, output: torch.Tensor, layer: int, count: int, seed) -> torch.Tensor:
        """The ``count`` thresholds (gather layout) of one expert's layer for its routed rows ``output[n, ...]``."""
        gen = self._layer_generator(output.device, layer, seed)
        dtype = compute_dtype(output.dtype)
        u = torch.rand((*output.shape[:-1], count), generator=gen, dtype=dtype, device=output.device)
        return thresholds_from_uniforms(u)

    def draw_layer(
        self, output: torch.Tensor, group: LayerGroup, layer: int, count: int, seed
    ) -> torch.Tensor:
        """Draw the ``count`` thresholds of ``layer`` for ``output``'s leading shape (the gather layout) into the
        group's scratch buffer and return them (valid until the next layer's draw).

        The generator's state before each layer's draw is kept for the forward: when the same layer runs again in
        it (activation checkpointing recomputes it in the backward pass), the same thresholds are drawn again from
        that state, as the one-block path reuses its views, and the request's generator does not advance."""
        device, lead = output.device, output.shape[:-1]
        gen = self._layer_generator(device, layer, seed)
        dtype = compute_dtype(output.dtype)
        key = (id(group), device, dtype, "layer")
        cached = self.buffers.get(key)
        if cached is None:
            scratch = torch.empty((*lead, max(group.counts)), dtype=dtype, device=device)
            cached = self.buffers[key] = (scratch, None, {})
        out = cached[0][..., :count]
        return thresholds_from_uniforms(torch.rand(out.shape, generator=gen, out=out))
