"""What a model's config says about its FFLs: the text config, the hidden size, the FFL width, the expert count."""

from __future__ import annotations

import dataclasses

from torch import nn

from .known_architectures import FOUR_X_HIDDEN, WIDTH_FROM_MODULES

_EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "moe_num_experts", "n_routed_experts")


def text_config(model: nn.Module):
    """The decoder's text config (``get_text_config(decoder=True)``), else ``model.config`` (or ``None``)."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text(decoder=True)
        except (TypeError, ValueError):
            return get_text()
    return config


def hidden_size(model: nn.Module, config) -> int | None:
    """The model's hidden width: from the config, else the width of its input embeddings."""
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    dim = getattr(emb, "embedding_dim", None)
    return dim if isinstance(dim, int) else None


def config_d_ff(config, hidden: int | None = None) -> int | None:
    """The FFL width a config declares (``intermediate_size``, ``n_inner``, ``ffn_dim``, ``4 * hidden``...)."""
    model_type = getattr(config, "model_type", None)
    if model_type in WIDTH_FROM_MODULES:
        return None
    if model_type in FOUR_X_HIDDEN:
        attr = FOUR_X_HIDDEN[model_type]
        value = getattr(config, attr, None) if attr else None
        if isinstance(value, int) and value > 0:
            return value
        return 4 * hidden if hidden else None
    for attr in _declared_first(
        config, ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff")
    ):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _declared_first(config, names: tuple[str, ...]) -> list[str]:
    """``names``, those the config's own class declares first (its dataclass fields, as transformers 5's configs have,
    and its ``attribute_map`` aliases), then the others. A keyword a class does not use stays an attribute
    (``OPTConfig(intermediate_size=...)``, whose width is ``ffn_dim``), and must not win over the declared name; an
    undeclared attribute is still read after them (remote-code configs with their own ``__init__``, the decoder
    widths that ``get_text_config`` copies onto BART-like configs)."""
    cls = type(config)
    declared = set(getattr(cls, "attribute_map", {}) or {})
    if "__dataclass_fields__" in cls.__dict__:  # the class's own dataclass, not one it inherits
        declared |= {f.name for f in dataclasses.fields(cls)}
    return [n for n in names if n in declared] + [n for n in names if n not in declared]


def expert_count(config) -> int:
    """The number of experts the config declares; 0 when it declares none (not a mixture of experts)."""
    for attr in _declared_first(config, _EXPERT_COUNT_ATTRS):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 1:
            return value
    return 0
