"""Finding the FFL sites of a model (:func:`find_ffl_sites`): a user override, else the table of known
architectures, else discovery; every site validated against the real module shapes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from .discovery import discover_in_layer, find_decoder_layers, refuse_weights_outside_sites
from .ffl_site import FFLSite, SiteError, SitePair, check_pairs
from .known_architectures import KNOWN_SITES
from .model_config import config_d_ff, expert_count, hidden_size, text_config
from .moe_layers import experts_in, moe_sites

#: the package's logger (records are named ``unlearn_hf.sites``, as before the package was split)
logger = logging.getLogger("unlearn_hf.sites")

_OVERRIDE_KEYS = {"pre", "key", "layers", "gate"}

#: A user override: relative names ``{"pre": ..., "key": ...}`` (optionally ``"layers"``: the path of the
#: layer list; ``"gate"``: the layout of a fused gate/up ``pre``, see :data:`~.ffl_site.GATE_LAYOUTS`; no
#: ``"pre"``: key sites only), or a callable returning one ``(pre, key)`` or ``(pre, key, gate)`` tuple per
#: decoder layer, as modules or full names (``pre`` may be ``None``).
SiteOverride = Mapping[str, str] | Callable[[nn.Module], Sequence[tuple[nn.Module | str | None, ...]]]


def _pairs_from_callable(model: nn.Module, override: Callable) -> list[SitePair]:
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    pairs = []
    try:
        returned = list(override(model))
    except TypeError as err:
        raise SiteError(f"The site override callable failed or did not return pairs: {err}") from err
    for i, pair in enumerate(returned):
        if not (isinstance(pair, (tuple, list)) and len(pair) in (2, 3)):
            raise SiteError(
                f"The site override returned {pair!r} for layer {i}; expected a (pre, key) or (pre, key, gate) tuple."
            )
        resolved = []
        for role, item in zip(("pre-activation", "key"), pair):
            if isinstance(item, str) or (item is None and role == "pre-activation"):
                resolved.append(item)
            elif isinstance(item, nn.Module) and id(item) in names:
                resolved.append(names[id(item)])
            else:
                raise SiteError(
                    f"The site override returned a {role} {type(item).__name__} for layer {i} that is not a "
                    f"module of {type(model).__name__} (nor a module name)."
                )
        gate = pair[2] if len(pair) == 3 else None
        if gate is not None and (not isinstance(gate, str) or resolved[0] is None):
            raise SiteError(
                f"The site override returned a gate layout {gate!r} for layer {i}; expected a string, with the "
                "fused projection as the pre-activation."
            )
        pairs.append(SitePair(resolved[0], resolved[1], gate))
    return pairs


def find_ffl_sites(model: nn.Module, override: SiteOverride | None = None) -> list[FFLSite]:
    """Return the FFL sites of every decoder layer of ``model``, validated against the real shapes.

    Args:
        model: a causal LM (``PreTrainedModel``) or any ``nn.Module`` when ``override`` is given.
        override: relative module names ``{"pre": "mlp.gate_proj", "key": "mlp.down_proj"}`` (plus optional
            ``"layers"``, the path of the layer list), or a callable ``model -> [(pre, key), ...]`` returning
            modules or full module names, one pair per decoder layer.

    Raises:
        SiteError: when sites cannot be found unambiguously or do not match the model's shapes.
    """
    config = text_config(model)
    model_type = getattr(config, "model_type", None)
    hidden = hidden_size(model, config)
    expected_d_ff = config_d_ff(config, hidden) if config is not None else None
    if callable(override) and not isinstance(override, Mapping):
        return check_pairs(model, _pairs_from_callable(model, override), hidden, None, "the override")
    if override is not None:
        if not isinstance(override, Mapping):
            raise SiteError(
                "A site override is a mapping {'pre': ..., 'key': ...} or a callable, "
                f"got {type(override).__name__}."
            )
        unknown, missing = set(override) - _OVERRIDE_KEYS, {"key"} - set(override)
        if unknown or missing or not all(isinstance(v, str) and v for v in override.values()):
            raise SiteError(
                "A site override needs a module name under 'key' (and optionally 'pre', 'gate', 'layers'); "
                f"got {dict(override)!r}."
            )
        if "gate" in override and "pre" not in override:
            raise SiteError("A site override's 'gate' layout needs the fused projection under 'pre'.")
        name, layers = find_decoder_layers(model, override.get("layers"))
        rel = SitePair(override.get("pre"), override["key"], override.get("gate"))
        return check_pairs(model, full_names(name, [rel] * len(layers)), hidden, None, "the override")
    table_error = None
    if model_type in KNOWN_SITES:
        rel = SitePair(*KNOWN_SITES[model_type])
        source = f"the table entry for {model_type!r}"
        try:
            name, layers = find_decoder_layers(model, holding=(rel.pre, rel.key))
            sites = check_pairs(model, full_names(name, [rel] * len(layers)), hidden, expected_d_ff, source)
            refuse_weights_outside_sites(model, [s.key_name for s in sites], name)
            return sites
        except SiteError as err:
            table_error = err
    try:
        name, layers = find_decoder_layers(model)
        hint = None if expert_count(config) else expected_d_ff
        act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
        if any(experts_in(layer) for layer in layers):
            sites = moe_sites(model, name, layers, hidden, act)
        else:
            pairs = full_names(
                name, [discover_in_layer(layer, i, hidden, hint, act) for i, layer in enumerate(layers)]
            )
            sites = check_pairs(model, pairs, hidden, expected_d_ff if table_error else None, "discovery")
    except SiteError as err:
        if table_error is not None:
            raise SiteError(f"{table_error} Discovery failed too: {err}") from err
        raise
    if table_error is not None:
        logger.warning(
            "%s Using the discovered sites %s / %s.", table_error, sites[0].pre_name, sites[0].key_name
        )
    else:
        logger.info(
            "Discovered FFL sites of model type %r: %s / %s", model_type, sites[0].pre_name, sites[0].key_name
        )
    missing = [s for s in sites if s.pre is None]
    if missing:
        logger.warning(
            "Model type %r: key sites only in %d of %d layers (Key Space Detection and Selective Pruning work, "
            "Neuron Adjust does not): %s",
            model_type,
            len(missing),
            len(sites),
            missing[0].pre_missing,
        )
    return sites


def full_names(layers_name: str, rel: Sequence[SitePair]) -> list[SitePair]:
    """Full module names of per-layer :class:`SitePair` names relative to the layers of the list ``layers_name``."""
    prefix = f"{layers_name}." if layers_name else ""
    return [pair.prefixed(f"{prefix}{i}.") for i, pair in enumerate(rel)]
