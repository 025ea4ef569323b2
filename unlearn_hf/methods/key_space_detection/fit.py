"""Fitting Key Space Detection: render the questions, fit one hypercube per candidate layer on the key vectors
at the questions' ends (one probe pass over every candidate layer), then calibrate layers, window and α on
held-out forget questions and retain questions (one more pass) or fall back to the defaults."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import torch

from ...data import DataSpec, _refuse_containers
from ...data_errors import refuse_non_examples
from ...holdout import example_key, holdout_split
from ...model_inputs import input_device
from ...stats import SiteStatistics
from ..config import resolve_layers
from ..fitting import data_role, probe_or_check
from .calibration import ALPHA_GRID, calibrate
from .config import AUTO, MAX_WINDOW, KeySpaceDetectionConfig
from .distances import pad_left, trailing_distances, warn_long
from .fit_checks import warn_repeated, warn_unreached, warn_unused_settings
from .hypercube import hypercube_radius
from .key_units import key_units, unit_of, unit_readers, units_cut_by_generate
from .rendering import QueryRenderer, RenderedQuery

#: What the probe keeps of the query keys besides their extremes (the hypercube's centre, scale and radius).
STATISTICS = ("moments",)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FitResult:
    """The resolved config and the fitted tensors of the chosen layers (plus the calibration table)."""

    config: KeySpaceDetectionConfig
    state: dict[str, torch.Tensor]


def read_queries(data: Any, spec: DataSpec, role: str) -> list[Any]:
    """The queries in ``data``: question strings or chat message lists, from a list, dicts or a ``Dataset``
    (column ``spec.prompt_column`` or ``spec.text_column``)."""
    if data is None:
        raise ValueError(f"Key Space Detection got no {role} data (None).")
    if isinstance(data, str):
        raise TypeError(f"Pass the {role} questions as a list of strings, not one string.")
    column = spec.prompt_column or spec.text_column
    names = getattr(data, "column_names", None)
    if names is None and (
        isinstance(data, Mapping) or hasattr(data, "columns")
    ):  # iterating would yield names
        if isinstance(data, Mapping):
            _refuse_containers(data)  # a DatasetDict: its own words
        raise TypeError(
            f"The {role} data is a {type(data).__name__} of columns: pass a list of questions (e.g. "
            f"list(df[{column!r}])) or a datasets.Dataset (Dataset.from_pandas(df) / Dataset.from_dict(d))."
        )
    refuse_non_examples(data)  # a path, a set
    if names is not None:
        if column not in names:
            raise ValueError(
                f"Column {column!r} not found in the {role} data set; available columns: {list(names)}."
            )
        out = list(data[column])
    else:
        out = [q[column] if isinstance(q, Mapping) and column in q else q for q in data]
    for i, q in enumerate(out):
        if isinstance(q, Mapping):
            raise ValueError(f"{role} example {i} has no key {column!r}; available keys: {sorted(q)}.")
    if not out:
        need = (
            "at least 2 forget questions are needed" if role == "forget" else "give retain questions or None"
        )
        raise ValueError(f"The {role} data is empty: {need}.")
    return out


def _render(renderer: QueryRenderer, queries: list[Any], role: str) -> list[list[RenderedQuery]]:
    """``renderer.render(queries)``, its errors ("Query 3: ...") naming the data set they are about."""
    with data_role(role, plain=True):
        return renderer.render(queries)


def _is_token_batches(data: Any) -> bool:
    """Whether ``data`` is tokenized batches (a mapping with an ``input_ids`` tensor, a list of them, or an
    iterator, which only batches can be)."""
    if isinstance(data, Mapping):
        return torch.is_tensor(data.get("input_ids"))
    if isinstance(data, (list, tuple)):
        return bool(data) and isinstance(data[0], Mapping) and torch.is_tensor(data[0].get("input_ids"))
    return getattr(data, "column_names", None) is None and not hasattr(data, "__len__")


def _fit_cubes(stats: SiteStatistics, sites: list, layers: list[int], eps: float) -> dict[int, tuple]:
    """The hypercube ``(μ, σ, k, count)`` of each site of ``layers``; a routed expert to which fewer than 2 fitted
    queries were routed has none (:mod:`.key_units`)."""
    cubes = {}
    for i in layers:
        s = stats.layers[i]
        if s.minimum is None:
            raise ValueError("Precomputed key statistics must track per-dimension min/max (query mode).")
        if s.count < 2:
            if sites[i].routed:
                continue
            raise ValueError(
                f"Key Space Detection needs at least 2 forget queries: the standard deviation is undefined for "
                f"{s.count}."
            )
        std = s.std(eps)
        cubes[i] = (
            s.mean.double(),
            std.double(),
            hypercube_radius(s.mean, std, s.minimum, s.maximum),
            s.count,
        )
    return cubes


def fit_key_space(
    model,
    config: KeySpaceDetectionConfig,
    forget: Any,
    retain: Any,
    tokenizer: Any,
    *,
    spec: DataSpec,
    show_progress: bool,
) -> FitResult:
    """Fit (and calibrate) Key Space Detection on ``model`` as it runs. See :class:`KeySpaceDetectionConfig`."""
    sites = model.ffl_sites
    n_layers = len(sites)
    units = key_units(sites)
    cut = units_cut_by_generate(model, sites, units)
    if cut:
        logger.info(
            "Key Space Detection: layers %s run over the last position only when generating: no candidates.",
            cut,
        )
        units = {u: m for u, m in units.items() if u not in cut}
        if not units:
            raise ValueError(
                "Key Space Detection: every layer of this model runs over the last position only when it generates "
                "(KV-shared layers), so no layer sees a question's end."
            )
    dense = [u for u in units if not sites[u].routed]
    middle = [(dense or list(units))[len(dense or units) // 2]]
    fixed = None  # the units of the config's layers (a routed expert's layer: all experts of its layer)
    if config.layers not in (AUTO, None):
        owner = unit_of(sites)
        fixed = sorted({owner[i] for i in resolve_layers(config.layers, n_layers)})
        if set(fixed) & set(cut):
            raise ValueError(
                f"Key Space Detection layers {sorted(set(fixed) & set(cut))} run over the last position only when the "
                "model generates (generate's logits_to_keep=1: Gemma 4's KV-shared layers), so they never see a "
                f"question's end; choose among layers {sorted(u for u in units if not sites[u].routed)}."
            )
        widths = sorted({sites[u].d_ff for u in fixed})
        if len(widths) > 1:
            raise ValueError(
                f"Key Space Detection layers {fixed} have keys of different widths {widths}; the hypercubes of one "
                "method share one width. Fit one method per width (name=...), or choose layers of one width."
            )
    # routed experts read beside their own forward, as the decision reads them (see key_units)
    probe_kw = dict(
        role="forget",
        site="key",
        statistics=STATISTICS,
        mode="last",
        spec=spec,
        show_progress=show_progress,
        sites=sites,
        experts_own_forward=True,
    )

    if isinstance(forget, SiteStatistics) or _is_token_batches(forget):
        # precomputed statistics or tokenized prompts: fitted on the prompts' last tokens, nothing to render
        if retain is not None:
            logger.info("Key Space Detection: tokenized or precomputed forget data is not calibrated.")
        chosen = fixed or middle
        members = _members(units, chosen)
        stats = probe_or_check(model, forget, tokenizer, layers=members, **probe_kw)
        window = 1 if config.window == AUTO else config.window
        alpha = 1.0 if config.alpha == AUTO else config.alpha
        return _result(
            config, _fitted(_fit_cubes(stats, sites, members, config.eps), units, chosen), alpha, window, None
        )

    renderer = QueryRenderer(
        tokenizer,
        inputs=config.inputs,
        chat=config.chat_template,
        system_prompt=config.system_prompt,
        templates=config.templates,
        bare=config.bare_question,
    )
    queries = read_queries(forget, spec, "forget")
    if len(queries) < 2:
        raise ValueError(
            f"Key Space Detection needs at least 2 forget queries: the standard deviation is undefined for "
            f"{len(queries)}."
        )
    autos = [f for f in ("layers", "alpha", "window") if getattr(config, f) == AUTO]
    calibrating = retain is not None and bool(autos)
    warn_unused_settings(config, renderer, retain, autos, queries)
    if retain is None and autos:
        logger.info(
            "Key Space Detection: no retain data, so %s not calibrated: the middle layer, alpha=1 and the narrowest "
            "window covering the fitted renderings are used.",
            "/".join(autos),
        )
    fit_idx, held_idx = (
        holdout_split(
            [example_key(q) for q in queries],
            config.calibration_fraction,
            "{n} forget questions are too few to hold out {n_held} for calibration and fit on at least 2; give "
            "more questions, no retain data, or fixed layers, alpha and window.",
        )
        if calibrating
        else (range(len(queries)), [])
    )
    rendered = _render(renderer, queries, "forget")  # every query at once: an error names its index
    fit_rows = [r for i in fit_idx for r in rendered[i]]
    retain_rows, retain_groups, groups = [], [], {}
    if calibrating:  # read and rendered before any forward: bad retain data fails at once
        if type(retain).__name__ in (
            "DatasetDict",
            "IterableDatasetDict",
        ):  # a data set's splits, not named skills
            raise ValueError(
                f"The retain data is a {type(retain).__name__} of splits {list(retain)}: calibration would read "
                "every split (test included). Pass one split, or name your retain sets: {'code': data['train']}."
            )
        groups = retain if isinstance(retain, Mapping) else {"retain": retain}
        if not groups:
            raise ValueError(
                "The retain data is an empty mapping: give at least one named retain set, or retain=None (no "
                "calibration)."
            )
        retain_queries = []
        for name, data in groups.items():
            role = f"retain ({name})" if isinstance(retain, Mapping) else "retain"
            group = read_queries(data, spec, role)
            retain_queries += group
            for rows in _render(renderer, group, role):
                retain_rows += rows
                retain_groups += [f"{name}/{r.rendering}" for r in rows]
        warn_repeated(queries, retain_queries)
    candidates = fixed or (list(units) if calibrating and config.layers == AUTO else middle)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [r.input_ids[: r.question_end + 1] for r in fit_rows]
    # the decision reads a question's last tokens: those are kept
    warn_long(prompts, spec.max_length, "rendered forget queries")
    prompts = [p[-spec.max_length :] for p in prompts]
    batches = [
        dict(zip(("input_ids", "attention_mask"), pad_left([prompts[i] for i in b], pad, spec.max_length)))
        for b in spec.plan([len(p) for p in prompts], input_device(model))
    ]
    stats = probe_or_check(model, batches, tokenizer, layers=_members(units, candidates), **probe_kw)
    if stats.count < 2:
        raise ValueError(
            f"Key Space Detection needs at least 2 forget queries: the standard deviation is undefined for "
            f"{stats.count}."
        )
    cubes = _fit_cubes(stats, sites, _members(units, candidates), config.eps)
    if fixed is None:  # a routed unit none of whose experts got 2 fitted queries is no candidate
        candidates = [u for u in candidates if any(i in cubes for i in units[u])] or candidates
    _fitted(cubes, units, candidates)  # raises for a candidate without a hypercube
    narrowest = min(MAX_WINDOW, max(r.trailing for r in fit_rows) + 1)
    if config.window != AUTO:
        windows = [config.window]
    else:
        windows = list(range(narrowest, min(MAX_WINDOW, narrowest + config.max_window_slack) + 1))
    if not calibrating:
        alpha = 1.0 if config.alpha == AUTO else config.alpha
        warn_unreached(fit_rows, windows[0])
        return _result(config, _fitted(cubes, units, candidates), alpha, windows[0], None)

    held = [r for i in held_idx for r in rendered[i]]
    z_kw = dict(
        window=max(windows),
        pad_id=pad,
        spec=spec,
        show_progress=show_progress,
    )
    readers = unit_readers(sites, cubes, candidates, alpha=1.0)
    # held-out forget and retain rows in one pass: one length-sorted plan pads less than two
    z = trailing_distances(model, held + retain_rows, sites, readers, desc="calibrating", **z_kw)
    zf, zr = z[: len(held)], z[len(held) :]
    cal = calibrate(
        zf,
        [r.rendering for r in held],
        zr,
        retain_groups,
        layer_ids=candidates,
        windows=windows,
        max_false_rate=config.max_false_rate,
        layers=fixed,
        alpha=None if config.alpha == AUTO else config.alpha,
        rule=config.rule,
        max_layers=config.max_layers,
        widths=[sites[u].d_ff for u in candidates],
    )
    warn_unreached(fit_rows, cal.window)
    worst = min(cal.forget_rate.values())
    logger.info(
        "Key Space Detection calibrated: layers %s, window %d, alpha %.4f; held-out forget abstention %s; false "
        "abstention %s (budget %.3f).",
        cal.layers,
        cal.window,
        cal.alpha,
        _fmt(cal.forget_rate),
        _fmt(cal.false_rate),
        config.max_false_rate,
    )
    if worst < 0.5:
        logger.warning(
            "Key Space Detection abstains on only %.0f%% of the held-out forget questions in its worst rendering "
            "within the false-abstention budget %.3f (half of it spent on the calibration's retain questions).",
            100 * worst,
            config.max_false_rate,
        )
    summary = {
        "held_out_forget": len(held_idx),
        "fitted_forget": len(fit_idx),
        "retain": {name: sum(1 for g in retain_groups if g.startswith(f"{name}/")) for name in groups},
        "forget_rate": cal.forget_rate,
        "false_rate": cal.false_rate,
        "max_false_rate": config.max_false_rate,
    }
    table = {
        "calibration_layers": cal.table_layers.to(torch.int64),
        "calibration_alphas": ALPHA_GRID.clone(),
        "calibration_forget": cal.table_forget,
        "calibration_false": cal.table_false,
    }
    return _result(config, _fitted(cubes, units, cal.layers), cal.alpha, cal.window, summary, table)


def _fmt(rates: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in rates.items())


def _members(units: dict[int, list[int]], chosen: list[int]) -> list[int]:
    return sorted(i for u in chosen for i in units[u])


def _fitted(cubes: dict[int, tuple], units: dict[int, list[int]], chosen: list[int]) -> dict[int, tuple]:
    """The hypercubes of the units ``chosen``: every site of theirs that has one.

    Raises:
        ValueError: a unit has none (routed experts to none of which 2 fitted queries were routed).
    """
    empty = [u for u in chosen if not any(i in cubes for i in units[u])]
    if empty:
        raise ValueError(
            f"Key Space Detection: layers {empty} have no hypercube: no expert of theirs had at least 2 fitted "
            "queries routed to it. Give more forget questions or choose other layers."
        )
    idle = [i for i in _members(units, chosen) if i not in cubes]
    if idle:
        logger.info(
            "Key Space Detection: %d experts (sites %s) got fewer than 2 fitted queries: they have no hypercube and "
            "no say in the decision; a query all of whose experts are among them is never inside.",
            len(idle),
            idle,
        )
    return {i: cubes[i] for i in _members(units, chosen) if i in cubes}


def _result(config, chosen: dict[int, tuple], alpha, window, summary, table=None) -> FitResult:
    config = dataclasses.replace(
        config, layers=sorted(chosen), alpha=float(alpha), window=int(window), calibration=summary
    )
    rows = [chosen[i] for i in config.layers]
    state = {
        "layers": torch.tensor(config.layers, dtype=torch.int64),
        "center": torch.stack([c[0] for c in rows]).to(torch.float64),
        "scale": torch.stack([c[1] for c in rows]).to(torch.float64),
        "k": torch.tensor([c[2] for c in rows], dtype=torch.float64),
        "count": torch.tensor([c[3] for c in rows], dtype=torch.int64),
        **(table or {}),
    }
    return FitResult(config, state)
