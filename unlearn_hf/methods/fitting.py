"""Probing for a fit, shared by every method: the tokenizer check, and probing data or validating precomputed
statistics in its place."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..adapters import check_no_adapters
from ..data import (
    DataSpec,
    _columns_of,
    _is_tokenized_batch,
    _records,
    _refuse_containers,
    encode_pair,
    refuse_empty,
)
from ..data_errors import DataError, DataTypeError, as_list
from ..model_identity import architecture_id, same_model
from ..probe import probe
from ..sites import FFLSite
from ..stats import DEFAULT_STATISTICS, SiteStatistics, check_finite
from ..tokenizing import TextTokenizer
from .config import resolve_layers


def check_fit_inputs(model, tokenizer: Any) -> None:
    """Refuse to fit on an unlearned ``model`` whose modules carry PEFT adapters (see :mod:`unlearn_hf.adapters`),
    or with a ``tokenizer`` that does not fit its base model."""
    check_no_adapters(model, "fit unlearning methods on this model")
    check_tokenizer(model.get_base_model(), tokenizer)
    check_weights_loaded(model.get_base_model())


def check_weights_loaded(model) -> None:
    """Refuse a model whose weights or buffers were never loaded (on the ``meta`` device: built under accelerate's
    ``init_empty_weights``, or a rotary table a state dict does not hold): its probe would fail deep inside a
    forward. Tensors that accelerate offloads (meta under its hook on their module or a module above) are loaded at
    every forward and pass."""
    hooked = {n for n, m in model.named_modules() if hasattr(m, "_hf_hook")}
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    meta = next(
        (n for n, t in tensors if t.is_meta and not any(n.startswith(f"{h}.") or not h for h in hooked)),
        None,
    )
    if meta is not None:
        raise ValueError(
            f"The model is not loaded: {meta} is on the meta device (a model built under init_empty_weights or "
            "torch.device('meta'); load_state_dict(..., assign=True) leaves the buffers a state dict does not hold, "
            "such as rotary tables, there). Load it with from_pretrained, or build it on a real device, before fitting."
        )


def check_tokenizer(model, tokenizer: Any) -> None:
    """Refuse a tokenizer whose vocabulary does not fit the model's embedding table."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}: "
            "they do not belong together."
        )


def _check_precomputed(
    data: SiteStatistics,
    model,
    *,
    role: str,
    site: str,
    mode: str,
    layers: list[int],
    sites,
    statistics: Sequence[str],
) -> None:
    problems = []
    if data.site != site:
        problems.append(f"site {data.site!r} != {site!r}")
    missing = sorted({q for s in data.layers.values() for q in statistics if q not in s.quantities})
    if missing:
        problems.append(f"they lack the statistics {missing} (probe with statistics including them)")
    if data.mode != mode:
        problems.append(f"token mode {data.mode!r} != {mode!r}")
    if sorted(data.layers) != sorted(layers):
        problems.append(f"layers {sorted(data.layers)} != {sorted(layers)}")
    if not same_model(data.architecture_id, architecture_id(model)):
        problems.append("they were probed on a different model (or other weights of this one)")
    if sites is not None and not problems:
        by_layer = {s.layer: s for s in sites}
        for i in sorted(data.layers):
            dim = data.layers[i].dim
            if i in by_layer and dim != by_layer[i].d_ff:
                problems.append(f"layer {i} has width {dim}, the model's FFL has {by_layer[i].d_ff}")
    if not problems and data.count == 0:
        problems.append("they hold no values")
    if problems:
        raise ValueError(f"Precomputed {role} statistics do not fit: " + "; ".join(problems) + ".")


def probe_or_check(
    model,
    data: Any,
    tokenizer: Any,
    *,
    role: str,
    site: str,
    mode: str,
    layers: list[int],
    spec: DataSpec,
    show_progress: bool,
    statistics: Sequence[str] = DEFAULT_STATISTICS,
    sites: Sequence[FFLSite] | None = None,
    experts_own_forward: bool = False,
) -> SiteStatistics:
    """Probe ``data`` at ``site``, or validate precomputed :class:`SiteStatistics` given in its place.

    Args:
        model: the unlearned model being fitted. It is probed as it runs, with the methods already attached
            active, so a method fitted after others (e.g. KSD after Neuron Adjust) sees the activations the
            others produce; with nothing attached this is exactly the base model.
        data: anything :func:`unlearn_hf.probe.probe` accepts, or precomputed statistics.
        role: ``"forget"`` / ``"retain"``, for messages.
        site / mode / layers: where and which tokens to probe (precomputed statistics must match them).
        statistics: what the method reads (see :func:`unlearn_hf.probe.probe`); precomputed statistics must keep it.
        spec / show_progress: passed to the probe.
        sites: the model's FFL sites (e.g. the wrapper's, honouring a site override); also used to check the
            width of precomputed statistics. Default: found on ``model``.
        experts_own_forward: see :func:`unlearn_hf.probe.probe`.

    Raises:
        ValueError: ``data`` is ``None`` or empty, or precomputed statistics belong to another site, token mode,
            layer set or model.
    """
    if data is None:
        raise ValueError(f"This method needs {role} data (got None).")
    if isinstance(data, SiteStatistics):
        _check_precomputed(
            data, model, role=role, site=site, mode=mode, layers=layers, sites=sites, statistics=statistics
        )
        check_finite(data, f"The probe behind the precomputed {role} statistics")
        return data
    with data_role(role):
        return probe(
            model,
            data,
            tokenizer,
            site=site,
            mode=mode,
            layers=layers,
            sites=sites,
            spec=spec,
            statistics=statistics,
            show_progress=show_progress,
            desc=f"probing {role}",
            experts_own_forward=experts_own_forward,
        )


@contextlib.contextmanager
def data_role(role: str, plain: bool = False) -> Iterator[None]:
    """Name the data set in the data errors raised within (forget and retain are read alike, so "Example 2 is a
    NoneType" does not say which to look in): "The retain data: Example 2 ...". ``plain``: plain ``ValueError`` /
    ``TypeError`` too (code that reads only the data, such as rendering queries; other kinds are left as they are)."""
    try:
        yield
    except (ValueError, TypeError) as err:
        if not isinstance(err, (DataError, DataTypeError)) and not (
            plain and type(err) in (ValueError, TypeError)
        ):
            raise
        raise type(err)(f"The {role} data: {err}") from err


def check_examples(data: Any, spec: DataSpec, mode: str, role: str, tokenizer: Any = None) -> None:
    """Check the examples of text data as a fit reads them, before a fit splits them (``ratio="auto"`` holds some
    out), so that an error names the example's index in the data given; with ``tokenizer``, also that each has
    tokens (it was named by its index within its part). Tokenized batches are checked as read."""
    data = as_list(data)
    if (
        data is None
        or isinstance(data, (str, SiteStatistics))
        or not isinstance(data, Sequence)
        and _columns_of(data) is None
    ):
        return
    tok = None if tokenizer is None else TextTokenizer.of(tokenizer, mode)  # its own error, not the data's
    with data_role(role):
        _refuse_containers(data)
        if len(data) and (_columns_of(data) is not None or not _is_tokenized_batch(data[0])):
            records = _records(data, spec, mode)
            if tok is not None:
                refuse_empty([encode_pair(tok, p, c)[0] for p, c in records])


def probe_forget_and_retain(
    model,
    config: Any,
    forget: Any,
    retain: Any,
    tokenizer: Any,
    *,
    site: str,
    statistics: Sequence[str],
    spec: DataSpec,
    show_progress: bool,
    label: str,
) -> tuple[list[int], SiteStatistics, SiteStatistics]:
    """The paired probe of a neuron-level method: ``forget`` then ``retain`` at ``site`` of the config's layers,
    with the config's token mode, on the model as it runs. Returns ``(layers, forget stats, retain stats)``.

    Raises:
        ValueError: no retain data, a tokenizer that does not fit the model, or what :func:`probe_or_check`
            refuses.
    """
    check_fit_inputs(model, tokenizer)
    sites = model.ffl_sites
    layers = resolve_layers(config.layers, len(sites))
    if retain is None:
        raise ValueError(f"{label} needs retain data (got None).")
    for role, data in (("forget", forget), ("retain", retain)):
        if (
            isinstance(data, Mapping)
            and not _is_tokenized_batch(data)
            and not any(
                _columns_of(v) is not None for v in data.values()
            )  # a DatasetDict: refused in its words
        ):
            if "input_ids" in data:  # tokenizer output without return_tensors
                raise TypeError(
                    f"The {role} data is tokenizer output of lists: tokenize with return_tensors='pt' (and "
                    "padding=True), or pass the texts."
                )
            raise TypeError(
                f"The {role} data is a dict (keys {list(data)[:4]}): {label} reads one list of texts. Named sets "
                "({'code': texts, ...}) are for Key Space Detection's calibration; join them (texts_a + texts_b), or "
                "pass a dict of columns as a datasets.Dataset (Dataset.from_dict)."
            )
    kw = dict(
        site=site,
        mode=config.tokens,
        layers=layers,
        spec=spec,
        show_progress=show_progress,
        sites=sites,
        statistics=statistics,
    )
    stats_f = probe_or_check(model, forget, tokenizer, role="forget", **kw)
    stats_r = probe_or_check(model, retain, tokenizer, role="retain", **kw)
    return layers, stats_f, stats_r
