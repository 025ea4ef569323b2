"""Finding the FFL sites of a model (:func:`find_ffl_sites`): a user override, else the table of known
architectures, else discovery; every site validated against the real module shapes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from .discovery import discover_in_layer, find_decoder_layers
from .ffl_site import FFLSite, SiteError, check_pairs
from .known_architectures import KNOWN_SITES
from .model_config import config_d_ff, expert_count, hidden_size, text_config

#: the package's logger (records are named ``unlearn_hf.sites``, as before the package was split)
logger = logging.getLogger("unlearn_hf.sites")

_OVERRIDE_KEYS = {"pre", "key", "layers"}

#: A user override: relative names ``{"pre": ..., "key": ...}`` (optionally ``"layers"``: the path of the
#: layer list), or a callable returning one ``(pre, key)`` pair per decoder layer, as modules or full names.
SiteOverride = Mapping[str, str] | Callable[[nn.Module], Sequence[tuple[nn.Module | str, nn.Module | str]]]


def _pairs_from_callable(model: nn.Module, override: Callable) -> list[tuple[str, str]]:
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    pairs = []
    try:
        returned = list(override(model))
    except TypeError as err:
        raise SiteError(f"The site override callable failed or did not return pairs: {err}") from err
    for i, pair in enumerate(returned):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise SiteError(f"The site override returned {pair!r} for layer {i}; expected a (pre, key) pair.")
        resolved = []
        for role, item in zip(("pre-activation", "key"), pair):
            if isinstance(item, str):
                resolved.append(item)
            elif isinstance(item, nn.Module) and id(item) in names:
                resolved.append(names[id(item)])
            else:
                raise SiteError(
                    f"The site override returned a {role} {type(item).__name__} for layer {i} that is not a "
                    f"module of {type(model).__name__} (nor a module name)."
                )
        pairs.append((resolved[0], resolved[1]))
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
        unknown, missing = set(override) - _OVERRIDE_KEYS, {"pre", "key"} - set(override)
        if unknown or missing or not all(isinstance(v, str) and v for v in override.values()):
            raise SiteError(
                "A site override needs module names under 'pre' and 'key' (and optionally 'layers'); "
                f"got {dict(override)!r}."
            )
        name, layers = find_decoder_layers(model, override.get("layers"))
        pairs = full_names(name, [(override["pre"], override["key"])] * len(layers))
        return check_pairs(model, pairs, hidden, None, "the override")
    table_error = None
    if model_type in KNOWN_SITES:
        rel = KNOWN_SITES[model_type]
        source = f"the table entry for {model_type!r}"
        try:
            name, layers = find_decoder_layers(model, holding=rel)
            return check_pairs(model, full_names(name, [rel] * len(layers)), hidden, expected_d_ff, source)
        except SiteError as err:
            table_error = err
    try:
        name, layers = find_decoder_layers(model)
        hint = None if expert_count(config) else expected_d_ff
        pairs = full_names(
            name, [discover_in_layer(layer, i, hidden, hint) for i, layer in enumerate(layers)]
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
    return sites


def full_names(layers_name: str, rel: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Full module names of per-layer ``(pre, key)`` names relative to the layers of the list ``layers_name``."""
    prefix = f"{layers_name}." if layers_name else ""
    return [(f"{prefix}{i}.{p}", f"{prefix}{i}.{k}") for i, (p, k) in enumerate(rel)]
