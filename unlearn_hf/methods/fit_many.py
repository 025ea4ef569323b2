"""Fitting several methods in one call, ``unlearned.fit([config, ...], forget, retain, tokenizer)``, sharing
probe passes where that changes no result.

**Sequential** (the default) means exactly what consecutive ``fit`` calls mean: each config is fitted on the
model as it runs, with the ones before it attached. A pass made for an earlier config is reused by a later one
only when no config between them changes a site the later probe reads. A method changes the activations from
its first changed site on (:meth:`UnlearningMethod.changed_sites`: Neuron Adjust the pre-activation of its
first layer, Selective Pruning the key of its first layer, Key Space Detection nothing: it only decides on
abstention). A probe reads up to its last site (:meth:`UnlearningMethod.probe_sites`). Sites are ordered
through the layers, the pre-activation of a layer before its key. So ``[KSD, NA]`` on the same texts, or
``[NA on layers 20-29, SP on layers 0-9]``, share; ``[NA, SP]`` on the same layers does not (Selective
Pruning is probed with Neuron Adjust active, as two calls would do).

**Independent** (``independent=True``): every config is fitted on the model as it was before the call (none
sees another), every probe over the same tokens shares one pass, and the methods are attached together at the
end. This is how to fit, say, Neuron Adjust and Selective Pruning, or one method at several settings, for a
comparison: one pass instead of one per config.

Either way the call is all or nothing: when a fit fails, the methods it attached are removed again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from ..data import DataSpec
from ..fit_context import record_fit_context, site_positions
from ..probe_share import shared_passes
from .base import UnlearningMethod
from .config import MethodConfig

logger = logging.getLogger(__name__)


def share_groups(classes: Sequence[type], configs: Sequence[MethodConfig], n_layers: int) -> list[list[int]]:
    """Consecutive groups of config indices in which every probe reads only sites that the configs before it in
    the group do not change, so that one pass can serve the whole group."""
    groups: list[list[int]] = []
    for j, (cls, config) in enumerate(zip(classes, configs)):
        reads = site_positions(cls.probe_sites(config, n_layers), n_layers)
        last_read = max(reads, default=-1)
        if groups:
            group = groups[-1]
            changed = [
                p
                for i in group
                for p in site_positions(classes[i].changed_sites(configs[i], n_layers), n_layers)
            ]
            if last_read < min(changed, default=2 * n_layers):
                group.append(j)
                continue
        groups.append([j])
    return groups


def fit_configs(
    model: Any,
    configs: Sequence[MethodConfig],
    forget: Any,
    retain: Any,
    tokenizer: Any,
    *,
    names: Sequence[str] | None,
    spec: DataSpec,
    show_progress: bool,
    independent: bool,
) -> list[UnlearningMethod]:
    """Fit and attach ``configs`` on ``model`` (an ``UnlearnedModelForCausalLM``); see the module docstring. A
    single ``fit`` call is a list of one. Every config and name is checked before anything is probed."""
    configs = list(configs)
    if not configs:
        raise ValueError("fit() got an empty list of configs.")
    for c in configs:
        if not isinstance(c, MethodConfig):
            raise TypeError(f"config must be a method config, got {type(c).__name__}.")
        if c.method_type not in model.method_classes:
            raise ValueError(
                f"No implementation for method {c.method_type!r}; known: {sorted(model.method_classes)}."
            )
    if names is not None and not isinstance(names, (list, tuple)):
        raise ValueError(
            f"name must be a string or, with a list of configs, a list of strings; got {names!r}."
        )
    names = [c.method_type for c in configs] if names is None else list(names)
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"A method name must be a non-empty string, got {bad[0]!r}.")
    if len(names) != len(configs):
        raise ValueError(f"{len(names)} names for {len(configs)} configs.")
    for n in names:
        if n in model.methods:
            raise ValueError(
                f"A method named {n!r} is already attached; remove it first or pick another name."
            )
        if names.count(n) > 1:
            raise ValueError(f"The method name {n!r} is given twice; pass distinct names=[...].")
    for role, data in (("forget", forget), ("retain", retain)):
        if len(configs) > 1 and isinstance(data, Iterator):
            raise ValueError(
                f"fit() of {len(configs)} configs reads the {role} data for each of them, and a "
                f"{type(data).__name__} can be read only once: pass the batches as a list (list(...)) or a loader "
                "that can be iterated again (a DataLoader)."
            )
    classes = [model.method_classes[c.method_type] for c in configs]
    n_layers = len(model.ffl_sites)
    groups = [list(range(len(configs)))] if independent else share_groups(classes, configs, n_layers)
    fitted: dict[int, UnlearningMethod] = {}
    attached: list[str] = []
    try:
        for group in groups:
            sites: dict[str, set[int]] = {}
            kept: dict[str, set[str]] = {}  # per site kind, what the methods probing it read
            for i in group:
                for kind, layers in classes[i].probe_sites(configs[i], n_layers).items():
                    sites.setdefault(kind, set()).update(layers)
                    kept.setdefault(kind, set()).update(classes[i].statistics)
            # a lone config has nothing to share: its probes run as plain probes (no token fingerprints)
            sharing = shared_passes(sites, kept) if len(group) > 1 else contextlib.nullcontext()
            with sharing as share:
                for i in group:
                    fitted[i] = classes[i].fit(
                        model, configs[i], forget, retain, tokenizer, spec=spec, show_progress=show_progress
                    )
                    record_fit_context(model, fitted[i])
                    if not independent:
                        model.add_method(names[i], fitted[i])
                        attached.append(names[i])
            if share is not None and share.hits:
                logger.info("fit: %d probe(s) reused a shared pass.", share.hits)
        if independent:
            for i in range(len(configs)):
                model.add_method(names[i], fitted[i])
                attached.append(names[i])
    except BaseException:
        for name in reversed(attached):
            model.remove_method(name)
        raise
    return [fitted[i] for i in range(len(configs))]
