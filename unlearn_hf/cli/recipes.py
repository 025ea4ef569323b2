"""Fitting the methods from skills, sharing one probing pass between Neuron Adjust and Selective Pruning."""

from __future__ import annotations

import logging
from typing import Any

from ..data import DataSpec
from ..methods import KeySpaceDetectionConfig, NeuronAdjustConfig, SelectivePruningConfig
from ..probe import probe

logger = logging.getLogger(__name__)

METHOD_NAMES = {"na": "neuron_adjust", "sp": "selective_pruning", "ksd": "key_space_detection"}


def retain_texts(retain: list[Any], n_probe: int) -> list[str]:
    """``n_probe`` retain texts, split evenly over the retain skills."""
    if not retain:
        return []
    per = max(1, n_probe // len(retain))
    return [t for skill in retain for t in skill.probe_texts(per)]


def fit_methods(
    unlearned: Any,
    tokenizer: Any,
    methods: list[str],
    forget: Any,
    retain: list[Any],
    *,
    n_probe: int = 200,
    ratio: float = 0.03,
    alpha: float = 1.0,
    layers: list[int] | None = None,
    refusal: str = "I can't help with that.",
    seed: int = 0,
    batch_size: int = 8,
    max_length: int = 512,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Fit ``methods`` (``na``, ``sp``, ``ksd``) on ``unlearned`` and return ``{name: method}``.

    Neuron Adjust and Selective Pruning read the same forget/retain texts, so both sites are probed in one pass
    and the statistics handed to both fits.
    """
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {sorted(METHOD_NAMES)}.")
    spec = DataSpec(batch_size=batch_size, max_length=max_length)
    fitted = {}
    if {"na", "sp"} & set(methods):
        if not retain:
            raise ValueError("Neuron Adjust and Selective Pruning need at least one retain skill.")
        sites = [s for s, m in (("pre", "na"), ("key", "sp")) if m in methods]
        kw = dict(site=sites, spec=spec, show_progress=show_progress)
        stats_f = probe(
            unlearned.base_model, forget.probe_texts(n_probe), tokenizer, desc="probing forget", **kw
        )
        stats_r = probe(
            unlearned.base_model, retain_texts(retain, n_probe), tokenizer, desc="probing retain", **kw
        )
        if "na" in methods:
            fitted["na"] = unlearned.fit(
                NeuronAdjustConfig(ratio=ratio, seed=seed), stats_f["pre"], stats_r["pre"], tokenizer
            )
        if "sp" in methods:
            fitted["sp"] = unlearned.fit(
                SelectivePruningConfig(ratio=ratio), stats_f["key"], stats_r["key"], tokenizer
            )
    if "ksd" in methods:
        fitted["ksd"] = unlearned.fit(
            KeySpaceDetectionConfig(layers=layers, alpha=alpha, refusal=refusal),
            forget.probe_queries(n_probe),
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            show_progress=show_progress,
        )
    for name, method in fitted.items():
        logger.info("fitted %s: %s", name, method.config)
    return fitted
