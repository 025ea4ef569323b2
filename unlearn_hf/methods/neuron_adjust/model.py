"""Neuron Adjust: fitting from forget/retain data and attaching the per-layer hooks."""

from __future__ import annotations

import torch

from ...data import DataSpec
from ...runtime import ForwardContext, HookRegistrar
from ...sites import module_device
from ..base import UnlearningMethod, check_layers, register_method
from ..neurons import check_tokenizer, probe_or_check, select_global, split_by_layer
from .config import NeuronAdjustConfig
from .layer import NeuronAdjustLayer

_STAT_NAMES = ("forget_mean", "forget_std", "retain_mean", "retain_std", "score")


def neuron_scores(config: NeuronAdjustConfig, mu_f, sd_f, mu_r, sd_r) -> torch.Tensor:
    """The ranking score of every neuron (higher = more specific to the forget skill)."""
    if config.score == "mean_diff":
        return mu_f - mu_r
    if config.score == "abs_mean_diff":
        return (mu_f - mu_r).abs()
    return (mu_f - mu_r) / ((sd_f.square() + sd_r.square()) / 2).sqrt()


@register_method
class NeuronAdjust(UnlearningMethod):
    """Neuron Adjust (intervention). State tensors, one entry per selected neuron, highest score first:
    ``layer_index``, ``neuron_index`` (int64) and ``forget_mean``, ``forget_std``, ``retain_mean``,
    ``retain_std``, ``score`` (float32)."""

    config_class = NeuronAdjustConfig

    @classmethod
    def fit(cls, model, config, forget, retain=None, tokenizer=None, *, spec: DataSpec, show_progress=True):
        base = model.base_model
        check_tokenizer(base, tokenizer)
        layers = check_layers(config.layers, model.ffl_sites)
        kw = dict(site="pre", mode=config.tokens, layers=layers, spec=spec, show_progress=show_progress)
        stats_f = probe_or_check(base, forget, tokenizer, role="forget", **kw)
        stats_r = probe_or_check(base, retain, tokenizer, role="retain", **kw)
        for role, st in (("forget", stats_f), ("retain", stats_r)):
            if st.count < 2:
                raise ValueError(f"The {role} set gave {st.count} token(s); Neuron Adjust needs at least 2.")
        per_layer = {}
        for i in layers:
            f, r = stats_f.layers[i], stats_r.layers[i]
            mu_f, sd_f, mu_r, sd_r = f.mean, f.std(config.eps), r.mean, r.std(config.eps)
            per_layer[i] = (mu_f, sd_f, mu_r, sd_r)
        scores = {i: neuron_scores(config, *v) for i, v in per_layer.items()}
        layer_index, neuron_index, score = select_global(scores, config.ratio)
        stacked = {
            name: torch.stack([per_layer[int(li)][k][int(ni)] for li, ni in zip(layer_index, neuron_index)])
            for k, name in enumerate(_STAT_NAMES[:4])
        }
        state = {"layer_index": layer_index, "neuron_index": neuron_index, "score": score}
        state.update(stacked)
        state = {k: v if k.endswith("index") else v.to(torch.float32) for k, v in state.items()}
        return cls(config, state)

    @classmethod
    def state_spec(cls, config, state):
        k = state["layer_index"].shape[0] if "layer_index" in state else 0
        spec = {"layer_index": ((k,), torch.int64), "neuron_index": ((k,), torch.int64)}
        spec.update({name: ((k,), torch.float32) for name in _STAT_NAMES})
        return spec

    @classmethod
    def validate_state(cls, state, config=None):
        super().validate_state(state, config)
        if config is not None:
            for name in ("forget_std", "retain_std"):
                if (state[name] <= 0).any():
                    raise ValueError(f"Tensor {name!r} holds non-positive standard deviations.")

    def attach(self, model, hooks: HookRegistrar) -> None:
        sites = model.ffl_sites
        self.layers: dict[int, NeuronAdjustLayer] = {}
        for layer, pos in split_by_layer(self.state["layer_index"]).items():
            if layer >= len(sites):
                raise ValueError(
                    f"Neuron Adjust state names layer {layer}; the model has {len(sites)} layers."
                )
            site = sites[layer]
            neurons = self.state["neuron_index"][pos]
            if int(neurons.max()) >= site.d_ff:
                raise ValueError(f"Layer {layer}: neuron index {int(neurons.max())} >= d_ff {site.d_ff}.")
            device = module_device(site.pre)
            adj = NeuronAdjustLayer(neurons, *(self.state[n][pos] for n in _STAT_NAMES[:4]), device=device)
            self.layers[layer] = adj
            hooks.forward_hook(site.pre, self._make_hook(adj, hooks.method_name))
        self._name = hooks.method_name

    def _make_hook(self, adj: NeuronAdjustLayer, name: str):
        deterministic = self.config.deterministic

        def hook(ctx: ForwardContext, output: torch.Tensor) -> torch.Tensor:
            gen = None if deterministic else self.generator(ctx, output.device)
            return adj(output, gen)

        return hook

    def generator(self, ctx: ForwardContext, device: torch.device) -> torch.Generator:
        """The request's generator on ``device``, created from ``config.seed`` at the request's first use."""
        gens = ctx.request.data.setdefault(self._name, {})
        gen = gens.get(device)
        if gen is None:
            gen = gens[device] = torch.Generator(device=device)
            gen.manual_seed(self.config.seed)
        return gen

    def reseed(self, seed: int) -> None:
        """Use ``seed`` for the requests that start from now on."""
        self.config.seed = int(seed)
