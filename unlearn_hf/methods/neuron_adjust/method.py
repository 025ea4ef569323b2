"""Neuron Adjust, the fitted method: fitting from forget/retain data, its state, attaching it, and seeds (the\nhooks are in :mod:`.attachment`, the arithmetic in :mod:`.layer`, the random draws in :mod:`.sampling`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from ...hooks import HookRegistrar
from ...sites import module_device, require_pre_sites
from ..ratio_search import RatioCurve, curve_spec, validate_curve
from ..registry import register_method
from ..selection import NeuronSelectionMethod, check_selection, scorable_layers, select_global, split_by_layer
from .attachment import DETERMINISTIC_HERE, NeuronAdjustAttachment
from .config import NeuronAdjustConfig
from .layer import NeuronAdjustLayer, weight_dtype

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


@register_method
class NeuronAdjust(NeuronSelectionMethod):
    """Neuron Adjust (intervention, ``docs/METHOD.md`` §3).

    Fitted state, one entry per selected neuron, highest score first: ``layer_index``, ``neuron_index``
    (int64) and ``forget_mean``, ``forget_std``, ``retain_mean``, ``retain_std`` (σ floored at ``eps``),
    ``score`` (float32).

    Randomness: every request (a ``generate`` call, or a forward without a cache) starts a fresh
    ``torch.Generator`` per device seeded with ``config.seed`` (or the seed of an enclosing :meth:`seeded`
    block), so the same input gives the same output. A small forward (a decoding step: at most
    :data:`~.sampling.GROUP_DRAW_MAX_NUMEL` thresholds per device) draws once per device, at its first adjusted
    layer, ``u = torch.rand((*leading_shape, K))`` for the K selected neurons of all the layers on that device
    (layers in increasing order, each layer's neurons in state order, see
    :meth:`NeuronAdjustAttachment.thresholds_layout`), which keeps the per-layer cost to a few small tensor
    operations; a larger one (a prefill) draws ``u = torch.rand((*leading_shape, K_layer))`` at each layer, in
    layer order, so its memory is one layer's. A value with log density ratio d is replaced where
    ``d > max(0, logit(u))``. The draws depend on the batch shape: for scores that must not, use
    ``config.deterministic``, which replaces whenever pF > pR and draws nothing.
    """

    config_class = NeuronAdjustConfig
    short_name = "na"
    site = "pre"
    statistics = ("moments",)
    label = "Neuron Adjust"
    summary = (
        "Moves the selected feed-forward neurons' pre-activations from the forget skill's distribution to the "
        "retain skill's in forward hooks, on every prompt; the base weights are unchanged. Retain skills lose "
        "some accuracy too: see the evaluation."
    )
    cli_options = ("ratio", "max_retain_drop", "ratio_grid", "seed", "deterministic")

    @classmethod
    def from_statistics(cls, config, layers, stats_f, stats_r, ratio, extra_state=None):
        """Select the top ``ratio`` of the neurons of ``layers`` from forget/retain pre-activation statistics;
        ``extra_state`` (the ``ratio="auto"`` curve) is stored with the selection."""
        for role, st in (("forget", stats_f), ("retain", stats_r)):
            if st.count < 2:
                raise ValueError(
                    f"The {role} set gave {st.count} token(s); Neuron Adjust needs at least 2 to estimate σ."
                )
        per_layer = {}
        for i in scorable_layers(layers, stats_f, stats_r, 2, "Neuron Adjust"):
            f, r = stats_f.layers[i], stats_r.layers[i]
            per_layer[i] = (f.mean, f.std(config.eps), r.mean, r.std(config.eps))
        scores = {i: neuron_scores(config, *v) for i, v in per_layer.items()}
        layer_index, neuron_index, score = select_global(scores, ratio)
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
        return cls(config, {**state, **(extra_state or {})})

    @classmethod
    def state_spec(cls, config, state):
        k = state["layer_index"].shape[0] if "layer_index" in state else 0
        spec = {"layer_index": ((k,), torch.int64), "neuron_index": ((k,), torch.int64)}
        spec.update({name: ((k,), torch.float32) for name in _STAT_NAMES})
        return {**spec, **curve_spec(config, state)}

    @classmethod
    def validate_state(cls, state, config=None):
        super().validate_state(state, config)
        if config is not None:
            if state["layer_index"].numel() == 0:
                raise ValueError("Neuron Adjust state selects no neurons.")
            for name in ("forget_std", "retain_std"):
                if (state[name] <= 0).any():
                    raise ValueError(f"Tensor {name!r} holds non-positive standard deviations.")
            validate_curve(state, config)

    @property
    def stochastic(self) -> bool:
        """Random replacement (the default) draws per position of the batch; deterministic replacement does not."""
        return not self.config.deterministic

    @property
    def ratio_curve(self) -> RatioCurve | None:
        """What ``ratio="auto"`` measured and chose (``None`` for a fixed ratio)."""
        return RatioCurve.from_state(self.state)

    # -- applying --------------------------------------------------------------------------------------------
    def attach(self, model, hooks: HookRegistrar) -> NeuronAdjustAttachment:
        sites = model.ffl_sites
        check_selection(self.state, sites, "Neuron Adjust")
        selected = split_by_layer(self.state["layer_index"])
        require_pre_sites([sites[layer] for layer in sorted(selected)], "Neuron Adjust")
        layers: dict[int, NeuronAdjustLayer] = {}
        for layer, pos in sorted(selected.items()):
            site = sites[layer]
            layers[layer] = NeuronAdjustLayer(
                self.state["neuron_index"][pos],
                *(self.state[n][pos] for n in _STAT_NAMES[:4]),
                device=module_device(site.pre),
                dtype=weight_dtype(site.pre),
                width=site.d_ff,
            )
        return NeuronAdjustAttachment(
            self, model, hooks.method_name, hooks, layers, {i: sites[i] for i in layers}
        )

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

    @property
    def deterministic_now(self) -> bool:
        """Whether this method replaces deterministically here: ``config.deterministic``, or inside
        :meth:`deterministic`."""
        return self.config.deterministic or id(self) in DETERMINISTIC_HERE.get()

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[None]:
        """Within the block (in this thread/task), a random-mode method replaces deterministically, whenever
        pF > pR, exactly as ``config.deterministic=True`` would (scores then do not depend on the batch shape);
        other threads keep drawing, and the method stays attached as it is. lm-eval's model scores under it.

        Example::

            with unlearned.methods["neuron_adjust"].deterministic():
                scores = evaluate_skills(unlearned, tokenizer, skills)
        """
        token = DETERMINISTIC_HERE.set(DETERMINISTIC_HERE.get() | {id(self)})
        try:
            yield
        finally:
            DETERMINISTIC_HERE.reset(token)
