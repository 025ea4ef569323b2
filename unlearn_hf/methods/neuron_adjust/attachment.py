"""Neuron Adjust attached to one model: the per-layer transforms on each layer's device and the hooks that run
them on the pre-activation outputs."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch

from ...context import ForwardContext
from ...hooks import HookRegistrar
from ...sites import FFLSite
from ..base import Attachment
from .layer import NeuronAdjustLayer
from .sampling import Draws, LayerGroup

#: The random-mode methods that replace deterministically in this thread/task (:meth:`NeuronAdjust.deterministic`):
#: their ids.
DETERMINISTIC_HERE: ContextVar[frozenset[int]] = ContextVar(
    "unlearn_hf_na_deterministic", default=frozenset()
)


class NeuronAdjustAttachment(Attachment):
    """The per-layer transforms (:attr:`layers`, ``{layer: NeuronAdjustLayer}``) of one model and their hooks.

    The layers of each device share one generator (:class:`~.sampling.LayerGroup`) and, in small forwards, one
    block of thresholds (:class:`~.sampling.Draws`); in deterministic mode nothing is drawn.
    """

    def __init__(
        self,
        method: Any,
        model: Any,
        name: str,
        hooks: HookRegistrar,
        layers: dict[int, NeuronAdjustLayer],
        sites: dict[int, FFLSite],
    ) -> None:
        super().__init__(method, model, name, hooks)
        self.layers = layers
        by_device: dict[torch.device, dict[int, NeuronAdjustLayer]] = {}
        for layer, adj in layers.items():
            if not sites[layer].routed:  # an expert's layer draws its own thresholds (see _stochastic_hook)
                by_device.setdefault(adj.device, {})[layer] = adj
        groups = {device: LayerGroup(group) for device, group in by_device.items()}
        for layer, adj in layers.items():
            site = sites[layer]
            if method.config.deterministic:
                hook = self._deterministic_hook(adj)
            else:
                hook = self._stochastic_hook(adj, layer, None if site.routed else groups[adj.device])
            hooks.forward_hook(site.pre, hook if site.gate is None else _on_gate(hook, site))

    @staticmethod
    def _deterministic_hook(adj: NeuronAdjustLayer):
        return lambda ctx, output: adj(output)

    def _stochastic_hook(self, adj: NeuronAdjustLayer, layer: int, group: LayerGroup | None):
        """The hook of a layer in random mode. An expert's layer (``group=None``) has rows of its own (the tokens
        routed to it), so it draws its thresholds at its hook, from the request's generator, replayed in a
        recomputation like a large forward's."""
        seed = self.method.current_seed
        name, method, forced = self.name, id(self.method), DETERMINISTIC_HERE.get

        def hook(ctx: ForwardContext, output: torch.Tensor) -> torch.Tensor:
            if method in forced():  # NeuronAdjust.deterministic: as the deterministic hook, nothing drawn
                return adj(output)
            draws = ctx.request.data.get(name)
            if draws is None:
                draws = ctx.request.data[name] = Draws()
            if draws.forward is not ctx or (group is not None and output.shape[:-1] != draws.lead):
                draws.start(ctx, output)  # a new forward (or shape)
            if group is None:
                return adj(output, draws.draw_routed(output, layer, adj.num_neurons, seed), full=False)
            full, per_layer = draws.mode(output, group)
            if per_layer:
                thresholds = draws.draw_layer(output, group, layer, adj.num_neurons, seed)
                return adj(output, thresholds, full=False)
            thresholds = draws.views.get(layer)
            if thresholds is None:  # first layer of this forward on this device
                draws.draw(output, group, seed, full)
                thresholds = draws.views[layer]
            return adj(output, thresholds, full=full)

        return hook

    def thresholds_layout(self) -> dict[int, tuple[int, int]]:
        """Where each layer's columns sit in a small forward's block of thresholds: ``{layer: (offset, width)}``
        (single-device models; layers in increasing order, each layer's neurons in state order). A large forward
        draws the same columns layer by layer, in this order."""
        out, offset = {}, 0
        for layer, adj in sorted(self.layers.items()):
            out[layer] = (offset, adj.num_neurons)
            offset += adj.num_neurons
        return out


def _on_gate(hook, site: FFLSite):
    """``hook`` applied to the gate columns of a fused gate/up output (the pre-activation), the up columns kept."""

    def fused(ctx: ForwardContext, output: torch.Tensor) -> torch.Tensor:
        gate = site.pre_activation(output)
        return site.with_pre_activation(output, gate, hook(ctx, gate))

    return fused
