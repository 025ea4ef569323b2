"""Selective Pruning: importance from forget/retain data, pruning through key-site pre-hooks."""

from __future__ import annotations

import torch

from ...hooks import HookRegistrar
from ...sites import module_device
from ..base import Attachment
from ..ratio_search import RatioCurve, curve_spec, validate_curve
from ..registry import register_method
from ..selection import NeuronSelectionMethod, check_selection, scorable_layers, select_global, split_by_layer
from .config import SelectivePruningConfig
from .layer import SelectivePruningLayer


@register_method
class SelectivePruning(NeuronSelectionMethod):
    """Selective Pruning (``docs/METHOD.md`` §5). State: ``layer_index``, ``neuron_index`` (int64) and ``score``
    (float32, the importance mean|x|_F / (mean|x|_R + eps)) of the pruned neurons, highest importance first."""

    config_class = SelectivePruningConfig
    short_name = "sp"
    site = "key"
    statistics = ("abs",)
    label = "Selective Pruning"
    summary = (
        "Zeroes the feed-forward neurons most specific to the forget skill (mean |activation| on forget over retain "
        "data), on every prompt; the base weights are unchanged. Retain skills lose some accuracy too: see the "
        "evaluation."
    )
    cli_options = ("ratio", "max_retain_drop", "ratio_grid")

    @classmethod
    def from_statistics(cls, config, layers, stats_f, stats_r, ratio, extra_state=None):
        """Select the top ``ratio`` of the key neurons of ``layers`` by importance from forget/retain statistics;
        ``extra_state`` (the ``ratio="auto"`` curve) is stored with the selection."""
        kept = scorable_layers(layers, stats_f, stats_r, 1, "Selective Pruning")
        scores = {i: stats_f.layers[i].abs_mean / (stats_r.layers[i].abs_mean + config.eps) for i in kept}
        layer_index, neuron_index, score = select_global(scores, ratio)
        state = {"layer_index": layer_index, "neuron_index": neuron_index, "score": score.float()}
        return cls(config, {**state, **(extra_state or {})})

    @classmethod
    def state_spec(cls, config, state):
        k = state["layer_index"].shape[0] if "layer_index" in state else 0
        return {
            "layer_index": ((k,), torch.int64),
            "neuron_index": ((k,), torch.int64),
            "score": ((k,), torch.float32),
            **curve_spec(config, state),
        }

    @classmethod
    def validate_state(cls, state, config=None):
        super().validate_state(state, config)
        if config is not None:
            if state["layer_index"].numel() == 0:
                raise ValueError("Selective Pruning state selects no neurons.")
            validate_curve(state, config)

    @property
    def ratio_curve(self) -> RatioCurve | None:
        """What ``ratio="auto"`` measured and chose (``None`` for a fixed ratio)."""
        return RatioCurve.from_state(self.state)

    def attach(self, model, hooks: HookRegistrar) -> SelectivePruningAttachment:
        sites = model.ffl_sites
        check_selection(self.state, sites, "Selective Pruning")
        layers: dict[int, SelectivePruningLayer] = {}
        for layer, pos in split_by_layer(self.state["layer_index"]).items():
            site = sites[layer]
            layers[layer] = SelectivePruningLayer(self.state["neuron_index"][pos], module_device(site.key))
        for layer, prune in layers.items():
            hooks.forward_pre_hook(sites[layer].key, lambda ctx, key, prune=prune: prune(key))
        return SelectivePruningAttachment(self, model, hooks.method_name, hooks, layers)


class SelectivePruningAttachment(Attachment):
    """Selective Pruning attached to one model: the pruning of each layer (:attr:`layers`) on its device."""

    def __init__(
        self, method, model, name: str, hooks: HookRegistrar, layers: dict[int, SelectivePruningLayer]
    ):
        super().__init__(method, model, name, hooks)
        self.layers = layers
