"""Neuron Adjust: fitting from forget/retain data and attaching the per-layer hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from ...data import DataSpec
from ...runtime import ForwardContext, HookRegistrar
from ...sites import module_device
from ..base import UnlearningMethod, check_layers, register_method
from ..neurons import check_selection, check_tokenizer, probe_or_check, select_global, split_by_layer
from .config import NeuronAdjustConfig
from .layer import NeuronAdjustLayer, thresholds_from_uniforms, uses_full_width

_STAT_NAMES = ("forget_mean", "forget_std", "retain_mean", "retain_std", "score")

#: Per-context seed overrides set by :meth:`NeuronAdjust.seeded`: ``{id(method): seed}``.
_SEED_OVERRIDES: ContextVar[dict[int, int] | None] = ContextVar("unlearn_hf_na_seed", default=None)


def neuron_scores(config: NeuronAdjustConfig, mu_f, sd_f, mu_r, sd_r) -> torch.Tensor:
    """The ranking score of every neuron (higher = more specific to the forget skill)."""
    if config.score == "mean_diff":
        return mu_f - mu_r
    if config.score == "abs_mean_diff":
        return (mu_f - mu_r).abs()
    return (mu_f - mu_r) / ((sd_f.square() + sd_r.square()) / 2).sqrt()


def _deterministic_hook(adj: NeuronAdjustLayer):
    return lambda ctx, output: adj(output)


class _Group:
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


class _Draws:
    """The random state of one attachment within one request: a generator per device (seeded at the request's
    first draw there), and the thresholds of the current forward, one view per layer.

    The thresholds live in buffers kept for the request, one per group and leading shape: each forward of a
    decoding loop refills them in place (``torch.rand(out=...)``, then ``logit_``, ``clamp_min_`` and, for the
    full-width layout, one ``index_copy_`` into zeros that stay zeros), so the per-layer views are made once.
    """

    __slots__ = ("generators", "forward", "lead", "views", "buffers")

    def __init__(self) -> None:
        self.generators: dict[torch.device, torch.Generator] = {}
        self.forward: ForwardContext | None = None
        self.lead: torch.Size | None = None
        self.views: dict[int, torch.Tensor] = {}
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, dict[int, torch.Tensor]]] = {}

    def draw(self, output: torch.Tensor, group: _Group, dtype: torch.dtype, seed) -> None:
        """Draw ``u = torch.rand((*output.shape[:-1], K))`` for the K selected neurons of ``group`` on
        ``output``'s device and store ``max(0, logit(u))`` per layer, in the layout of the layers' path
        (full-width views with zeros at unselected columns for small calls, see ``uses_full_width``)."""
        device = output.device
        gen = self.generators.get(device)
        if gen is None:
            gen = self.generators[device] = torch.Generator(device=device)
            gen.manual_seed(seed())
        lead = output.shape[:-1]
        full = uses_full_width(output) and None not in group.widths
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


def _weight_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@register_method
class NeuronAdjust(UnlearningMethod):
    """Neuron Adjust (intervention, METHOD.md §3).

    Fitted state, one entry per selected neuron, highest score first: ``layer_index``, ``neuron_index``
    (int64) and ``forget_mean``, ``forget_std``, ``retain_mean``, ``retain_std`` (σ floored at ``eps``),
    ``score`` (float32).

    Randomness: every request (a ``generate`` call, or a forward without a cache) starts a fresh
    ``torch.Generator`` per device seeded with ``config.seed`` (or the seed of an enclosing :meth:`seeded`
    block), so the same input gives the same output. Each forward draws once per device, at its first adjusted
    layer, ``u = torch.rand((*leading_shape, K))`` for the K selected neurons of all the layers on that device
    (layers in increasing order, each layer's neurons in state order, see :meth:`thresholds_layout`); a value
    with log density ratio d is replaced where ``d > max(0, logit(u))``. One draw per forward instead of one per
    layer keeps the per-layer cost to a few small tensor operations (for small decoding calls the draw is
    also laid out at full width, see :class:`NeuronAdjustLayer`). ``config.deterministic`` replaces whenever
    pF > pR and draws nothing.
    """

    config_class = NeuronAdjustConfig

    @classmethod
    def fit(cls, model, config, forget, retain=None, tokenizer=None, *, spec: DataSpec, show_progress=True):
        """Probe the pre-activation site of the chosen layers on ``forget`` and ``retain`` (text, tokenized
        batches or precomputed :class:`~unlearn_hf.stats.SiteStatistics`) and select the neurons.

        Raises:
            ValueError: missing/empty retain data, a set with fewer than 2 probed tokens, a tokenizer or
                statistics that do not belong to the model, token ids outside its vocabulary.
        """
        base = model.base_model
        sites = model.ffl_sites
        check_tokenizer(base, tokenizer)
        layers = check_layers(config.layers, sites)
        kw = dict(
            site="pre", mode=config.tokens, layers=layers, spec=spec, show_progress=show_progress, sites=sites
        )
        if retain is None:
            raise ValueError("Neuron Adjust needs retain data (got None).")
        stats_f = probe_or_check(model, forget, tokenizer, role="forget", **kw)
        stats_r = probe_or_check(model, retain, tokenizer, role="retain", **kw)
        for role, st in (("forget", stats_f), ("retain", stats_r)):
            if st.count < 2:
                raise ValueError(
                    f"The {role} set gave {st.count} token(s); Neuron Adjust needs at least 2 to estimate σ."
                )
        per_layer = {}
        for i in layers:
            f, r = stats_f.layers[i], stats_r.layers[i]
            per_layer[i] = (f.mean, f.std(config.eps), r.mean, r.std(config.eps))
        scores = {i: neuron_scores(config, *v) for i, v in per_layer.items()}
        layer_index, neuron_index, score = select_global(scores, config.ratio)
        state = {"layer_index": layer_index, "neuron_index": neuron_index}
        groups = split_by_layer(layer_index)
        for k, name in enumerate(_STAT_NAMES[:4]):
            values = torch.empty(layer_index.numel(), dtype=torch.float64)
            for layer, pos in groups.items():
                values[pos] = per_layer[layer][k][neuron_index[pos]]
            state[name] = values.to(torch.float32)
        state["score"] = score.to(torch.float32)
        # float32 rounding must not undo the floor
        for name in ("forget_std", "retain_std"):
            state[name] = state[name].clamp_min(torch.tensor(config.eps, dtype=torch.float32))
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
            if state["layer_index"].numel() == 0:
                raise ValueError("Neuron Adjust state selects no neurons.")
            for name in ("forget_std", "retain_std"):
                if (state[name] <= 0).any():
                    raise ValueError(f"Tensor {name!r} holds non-positive standard deviations.")

    # -- applying --------------------------------------------------------------------------------------------
    def attach(self, model, hooks: HookRegistrar) -> None:
        sites = model.ffl_sites
        check_selection(self.state, sites, "Neuron Adjust")
        layers: dict[int, NeuronAdjustLayer] = {}
        for layer, pos in sorted(split_by_layer(self.state["layer_index"]).items()):
            site = sites[layer]
            layers[layer] = NeuronAdjustLayer(
                self.state["neuron_index"][pos],
                *(self.state[n][pos] for n in _STAT_NAMES[:4]),
                device=module_device(site.pre),
                dtype=_weight_dtype(site.pre),
                width=site.d_ff,
            )
        # the layers of each device share one block of thresholds per forward
        by_device: dict[torch.device, dict[int, NeuronAdjustLayer]] = {}
        for layer, adj in layers.items():
            by_device.setdefault(adj.device, {})[layer] = adj
        groups = {device: _Group(group) for device, group in by_device.items()}
        for layer, adj in layers.items():
            if self.config.deterministic:
                hook = _deterministic_hook(adj)
            else:
                hook = self._stochastic_hook(adj, layer, hooks.method_name, groups[adj.device])
            hooks.forward_hook(sites[layer].pre, hook)
        #: The per-layer transforms of the latest attachment (for inspection).
        self.layers = layers

    def _stochastic_hook(self, adj: NeuronAdjustLayer, layer: int, name: str, group: _Group):
        seed = self.current_seed

        def hook(ctx: ForwardContext, output: torch.Tensor) -> torch.Tensor:
            draws = ctx.request.data.get(name)
            if draws is None:
                draws = ctx.request.data[name] = _Draws()
            if draws.forward is not ctx or output.shape[:-1] != draws.lead:  # a new forward (or shape)
                draws.forward, draws.lead, draws.views = ctx, output.shape[:-1], {}
            thresholds = draws.views.get(layer)
            if thresholds is None:  # first layer of this forward on this device
                draws.draw(output, group, adj.dtype, seed)
                thresholds = draws.views[layer]
            return adj(output, thresholds)

        return hook

    def thresholds_layout(self) -> dict[int, tuple[int, int]]:
        """Where each layer's columns sit in a forward's block of thresholds: ``{layer: (offset, width)}``
        (single-device models; layers in increasing order, each layer's neurons in state order)."""
        out, offset = {}, 0
        for layer, adj in sorted(self.layers.items()):
            out[layer] = (offset, adj.num_neurons)
            offset += adj.num_neurons
        return out

    # -- seeds -----------------------------------------------------------------------------------------------
    def current_seed(self) -> int:
        """The seed a request starting now uses: the innermost :meth:`seeded` block's, else ``config.seed``."""
        overrides = _SEED_OVERRIDES.get()
        if overrides is not None and id(self) in overrides:
            return overrides[id(self)]
        return self.config.seed

    @contextlib.contextmanager
    def seeded(self, seed: int) -> Iterator[None]:
        """Within the block (in this thread/task), requests start from ``seed`` instead of ``config.seed``.

        Example::

            with unlearned.methods["neuron_adjust"].seeded(123):
                out = unlearned.generate(**inputs)
        """
        overrides = dict(_SEED_OVERRIDES.get() or {})
        overrides[id(self)] = int(seed)
        token = _SEED_OVERRIDES.set(overrides)
        try:
            yield
        finally:
            _SEED_OVERRIDES.reset(token)

    def reseed(self, seed: int) -> None:
        """Use ``seed`` for the requests that start from now on (changes ``config.seed``)."""
        self.config.seed = int(seed)
