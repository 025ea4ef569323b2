"""Selective Pruning: importance from forget/retain data, pruning through key-site pre-hooks."""

from __future__ import annotations

import torch

from ...data import DataSpec
from ...runtime import HookRegistrar
from ...sites import module_device
from ..base import UnlearningMethod, check_layers, register_method
from ..neurons import check_selection, check_tokenizer, probe_or_check, select_global, split_by_layer
from .config import SelectivePruningConfig
from .layer import SelectivePruningLayer


@register_method
class SelectivePruning(UnlearningMethod):
    """Selective Pruning (METHOD.md §5). State: ``layer_index``, ``neuron_index`` (int64) and ``score``
    (float32, the importance mean|x|_F / (mean|x|_R + eps)) of the pruned neurons, highest importance first."""

    config_class = SelectivePruningConfig

    @classmethod
    def fit(cls, model, config, forget, retain=None, tokenizer=None, *, spec: DataSpec, show_progress=True):
        """Probe mean |x| at the key site of the chosen layers on ``forget`` and ``retain`` (text, tokenized
        batches or precomputed :class:`~unlearn_hf.stats.SiteStatistics`) and select the neurons to prune.

        Raises:
            ValueError: missing/empty data, a tokenizer or statistics that do not belong to the model, token
                ids outside its vocabulary.
        """
        base = model.base_model
        sites = model.ffl_sites
        check_tokenizer(base, tokenizer)
        layers = check_layers(config.layers, sites)
        kw = dict(
            site="key", mode=config.tokens, layers=layers, spec=spec, show_progress=show_progress, sites=sites
        )
        if retain is None:
            raise ValueError("Selective Pruning needs retain data (got None).")
        stats_f = probe_or_check(model, forget, tokenizer, role="forget", **kw)
        stats_r = probe_or_check(model, retain, tokenizer, role="retain", **kw)
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

    @classmethod
    def validate_state(cls, state, config=None):
        super().validate_state(state, config)
        if config is not None and state["layer_index"].numel() == 0:
            raise ValueError("Selective Pruning state selects no neurons.")

    def attach(self, model, hooks: HookRegistrar) -> None:
        sites = model.ffl_sites
        check_selection(self.state, sites, "Selective Pruning")
        layers: dict[int, SelectivePruningLayer] = {}
        for layer, pos in split_by_layer(self.state["layer_index"]).items():
            site = sites[layer]
            layers[layer] = SelectivePruningLayer(self.state["neuron_index"][pos], module_device(site.key))
        for layer, prune in layers.items():
            hooks.forward_pre_hook(sites[layer].key, lambda ctx, key, prune=prune: prune(key))
        #: The per-layer pruning of the latest attachment (for inspection).
        self.layers = layers
