"""Selective Pruning: importance from forget/retain data, pruning through key-site pre-hooks."""

from __future__ import annotations

import torch

from ...data import DataSpec
from ...runtime import HookRegistrar
from ...sites import module_device
from ..base import UnlearningMethod, check_layers, register_method
from ..neurons import check_tokenizer, probe_or_check, select_global, split_by_layer
from .config import SelectivePruningConfig
from .layer import SelectivePruningLayer


@register_method
class SelectivePruning(UnlearningMethod):
    """Selective Pruning. State: ``layer_index``, ``neuron_index`` (int64) and ``score`` (float32, the importance
    mean|x|_F / (mean|x|_R + eps)) of the pruned neurons, highest importance first."""

    config_class = SelectivePruningConfig

    @classmethod
    def fit(cls, model, config, forget, retain=None, tokenizer=None, *, spec: DataSpec, show_progress=True):
        base = model.base_model
        check_tokenizer(base, tokenizer)
        layers = check_layers(config.layers, model.ffl_sites)
        kw = dict(site="key", mode=config.tokens, layers=layers, spec=spec, show_progress=show_progress)
        stats_f = probe_or_check(base, forget, tokenizer, role="forget", **kw)
        stats_r = probe_or_check(base, retain, tokenizer, role="retain", **kw)
        scores = {i: stats_f.layers[i].abs_mean / (stats_r.layers[i].abs_mean + config.eps) for i in layers}
        layer_index, neuron_index, score = select_global(scores, config.ratio)
        return cls(config, {"layer_index": layer_index, "neuron_index": neuron_index, "score": score.float()})

    @classmethod
    def state_spec(cls, config, state):
        k = state["layer_index"].shape[0] if "layer_index" in state else 0
        return {
            "layer_index": ((k,), torch.int64),
            "neuron_index": ((k,), torch.int64),
            "score": ((k,), torch.float32),
        }

    def attach(self, model, hooks: HookRegistrar) -> None:
        sites = model.ffl_sites
        self.layers: dict[int, SelectivePruningLayer] = {}
        for layer, pos in split_by_layer(self.state["layer_index"]).items():
            if layer >= len(sites):
                raise ValueError(
                    f"Selective Pruning state names layer {layer}; the model has {len(sites)} layers."
                )
            site = sites[layer]
            neurons = self.state["neuron_index"][pos]
            if int(neurons.max()) >= site.d_ff:
                raise ValueError(f"Layer {layer}: neuron index {int(neurons.max())} >= d_ff {site.d_ff}.")
            prune = SelectivePruningLayer(neurons, module_device(site.key))
            self.layers[layer] = prune
            hooks.forward_pre_hook(site.key, lambda ctx, key, prune=prune: prune(key))
