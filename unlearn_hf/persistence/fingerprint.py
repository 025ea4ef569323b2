"""A cheap fingerprint of a base model, to refuse attaching unlearning fitted on another model.

The fingerprint holds the architecture (model type, layer count, vocabulary and hidden sizes, the FFL sites'
module names and weight shapes), for a few weight slices (the first rows of the input embedding and of the
first and last FFL key projections) the sha256 of their float32 values plus a small sample of those values, and
for every parameter a short hash and a few values of its first row (:func:`parameter_records`: a merged adapter or
a fine-tuning changes rows of parameters the three slices never see). Only these rows are read, never the whole
model. When the model is loaded in another dtype than at save time (e.g. saved in float32, loaded in bfloat16) the
hashes cannot match, so the samples are compared with a tolerance suited to half precision instead.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..adapters import plain_parameters
from ..model_identity import held_values
from ..sites import FFLSite
from .format import FingerprintMismatchError

logger = logging.getLogger(__name__)

#: Rows of each weight that are hashed.
SLICE_ROWS = 4
#: Values of each slice kept for dtype-tolerant comparison.
SAMPLE_SIZE = 32
#: Tolerance of the sample comparison across dtypes: |a - b| <= ATOL + RTOL * |b| (bf16 rounds at 2^-9 relative).
RTOL = 2.0**-6
ATOL = 1e-5


#: Values of each parameter's first row that :func:`parameter_records` keeps (dtype-tolerant comparison).
PARAMETER_SAMPLE = 4
#: Hex digits of each parameter's hash in :func:`parameter_records`.
PARAMETER_HASH_DIGITS = 16


def parameter_records(model: nn.Module, weights: Mapping[str, torch.Tensor] | None = None) -> list[list[Any]]:
    """``[name, dtype, shape, hash, sample]`` of every floating-point parameter of ``model`` (``named_parameters``
    order, named as in the plain model: PEFT adapters added to it are left out, see
    :func:`~unlearn_hf.adapters.plain_parameters`): ``hash``, the first 16 hex digits of the SHA-256 of its first
    row (``p.reshape(-1, p.shape[-1])[0]``: one row of a fused experts weight too; all of a 1-D parameter) as float32 little-endian bytes; ``sample``, 4 values of that row at
    ``round(linspace(0, n - 1, 4))`` (``None`` when one is not finite); both ``None`` for a parameter whose values
    are not here (meta device, or a distributed tensor's shard). ``weights``: the values to record instead of the
    model's, by name (the ``state_dict`` a save writes, see :func:`held_values`)."""
    records: list[list[Any]] = []
    for name, p in plain_parameters(model):
        if not p.is_floating_point():
            continue  # quantized storage: its dtype says nothing comparable
        dtype, shape = str(p.dtype).removeprefix("torch."), list(p.shape)
        values = held_values(model, name, p, weights)
        if values is None or p.numel() == 0 or hasattr(p, "to_local"):
            records.append([name, dtype, shape, None, None])
            continue
        row = values.detach().reshape(-1, p.shape[-1])[0] if p.ndim else values.detach().reshape(1)
        values = row.to("cpu", torch.float32).contiguous()
        digest = _float32_sha256(values)[:PARAMETER_HASH_DIGITS]
        records.append([name, dtype, shape, digest, _sample(values, PARAMETER_SAMPLE)])
    return records


def _float32_sha256(values: torch.Tensor) -> str:
    """The SHA-256 (hex) of float32 CPU ``values`` as little-endian bytes."""
    return hashlib.sha256(values.numpy().astype("<f4").tobytes()).hexdigest()


def _sample(values: torch.Tensor, n: int) -> list[float] | None:
    """``n`` values of the flat ``values`` at ``round(linspace(0, len - 1, n))``; ``None`` when one is not finite
    (JSON has no inf or NaN)."""
    idx = torch.linspace(0, values.numel() - 1, min(n, values.numel())).round().long()
    picked = values[idx]
    return [float(v) for v in picked] if bool(torch.isfinite(picked).all()) else None


def compare_parameters(
    saved: list[list[Any]], current: list[list[Any]], *, exact_upcasts: bool = False
) -> list[str]:
    """The differences between two :func:`parameter_records` (parameters missing, values that differ beyond a change
    of dtype), as sentences naming the first few.

    A difference of values between two dtypes passes when the samples agree within the half-precision tolerance
    (a checkpoint's base loaded in another dtype, or cast since). With ``exact_upcasts`` (the records of this very
    model as it was wrapped, :meth:`weights_changed`) a wider dtype must hold the recorded values exactly (see
    :func:`_rounding_only`): a small training step after an upcast is a change."""
    now = {r[0]: r for r in current}
    missing, reshaped, differ = [], [], []
    for name, dtype, shape, digest, sample in saved:
        c = now.get(name)
        if c is None:
            missing.append(name)
        elif shape != c[2]:
            reshaped.append(name)
        elif digest is not None and c[3] is not None and digest != c[3]:
            rounding = _rounding_only(dtype, c[1]) if exact_upcasts else dtype != c[1]
            if not rounding or not _samples_close(c[4], sample):
                differ.append(name)
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameters not found in the model ({_first(missing)})")
    if reshaped:
        problems.append(f"the shapes of {len(reshaped)} parameters differ ({_first(reshaped)})")
    if differ:
        problems.append(f"the values of {len(differ)} of {len(saved)} parameters differ ({_first(differ)})")
    return problems


def _rounding_only(saved: str | None, current: str | None) -> bool:
    """Whether a difference of values between a weight saved in dtype ``saved`` and the same weight in dtype
    ``current`` can come from rounding alone: the current dtype cannot hold every saved value (float32 to bfloat16,
    bfloat16 to float16). A wider dtype holds them exactly (bfloat16 to float32), so there any difference is a
    change of the weights (a fine-tuning step after an upcast)."""
    if saved == current:
        return False
    try:
        s, c = (torch.finfo(getattr(torch, d)) for d in (saved, current))
    except (TypeError, AttributeError):  # not a floating dtype torch knows: no rounding to allow for
        return False
    return not (
        c.bits >= s.bits and c.eps <= s.eps and c.max >= s.max and c.smallest_normal <= s.smallest_normal
    )


def _samples_close(current: list[float] | None, saved: list[float] | None) -> bool:
    """Whether two samples agree within the dtype tolerance (never when one is missing)."""
    return current is not None and saved is not None and _close(current, saved)


def _first(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _weight_slice(
    label: str,
    name: str,
    weight: torch.Tensor,
    model: nn.Module,
    weights: Mapping[str, torch.Tensor] | None,
    names: dict[int, str],
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "label": label,
        "name": name,
        "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "rows": min(SLICE_ROWS, weight.shape[0]) if weight.ndim else 0,
        "sha256": None,
        "sample": None,
    }
    held = _slice_values(model, name, weight, weights, names)
    if held is None or weight.ndim == 0:
        logger.info("Fingerprint: %s (%s) is not materialized; its values are not hashed.", label, name)
        return entry
    values = held.detach()[:SLICE_ROWS].to("cpu", torch.float32).contiguous().reshape(-1)
    entry["sha256"] = _float32_sha256(values)
    if values.numel():
        entry["sample"] = _sample(values, SAMPLE_SIZE)
    return entry


def _slice_values(
    model: nn.Module,
    name: str,
    weight: torch.Tensor,
    weights: Mapping[str, torch.Tensor] | None,
    names: dict[int, str],
) -> torch.Tensor | None:
    """The values of a fingerprinted ``weight`` (:func:`held_values`). One expert's slice of a 3-D experts weight is
    a view whose name is no parameter's (``names``: the model's, by ``id``), so accelerate's offload map does not know
    it: it is taken as the same view of its parameter's held values (what a save writes, or what accelerate keeps)."""
    base = weight._base
    if base is not None and id(base) in names:
        full = held_values(model, names[id(base)], base, weights)
        if full is not None and full.stride() == base.stride():
            offset = full.storage_offset() + weight.storage_offset() - base.storage_offset()
            return full.as_strided(weight.shape, weight.stride(), offset)
    return held_values(model, name, weight, weights)


def compute_fingerprint(
    model: nn.Module, sites: list[FFLSite], weights: Mapping[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """The fingerprint of ``model`` (the plain base model) with its FFL ``sites``, as a JSON-ready dict; ``weights``:
    the values a save writes instead of the model's (its ``state_dict``), by parameter name."""
    config = getattr(model, "config", None)
    names = _param_names(model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_weight = getattr(emb, "weight", None)
    vocab = int(emb_weight.shape[0]) if emb_weight is not None else getattr(config, "vocab_size", None)
    hidden = int(emb_weight.shape[1]) if emb_weight is not None and emb_weight.ndim == 2 else None
    slices = []
    if emb_weight is not None:
        slices.append(
            _weight_slice(
                "input embedding",
                names.get(id(emb_weight), "input_embeddings"),
                emb_weight,
                model,
                weights,
                names,
            )
        )
    for label, site in (("first FFL key projection", sites[0]), ("last FFL key projection", sites[-1])):
        w = getattr(site.key, "weight", None)
        if isinstance(w, torch.Tensor):
            slices.append(
                _weight_slice(label, names.get(id(w), site.key_name + ".weight"), w, model, weights, names)
            )
    return {
        "model_type": getattr(config, "model_type", None),
        "num_layers": len(sites),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": vocab,
        "hidden_size": hidden,
        "ffl_sites": [
            {
                "pre": s.pre_name,
                "key": s.key_name,
                "gate": s.gate,
                "d_ff": s.d_ff,
                "pre_shape": None if s.pre is None else _shape(s.pre),
                "key_shape": _shape(s.key),
            }
            for s in sites
        ],
        "weights": slices,
        "parameters": parameter_records(model, weights),
    }


def _shape(module: nn.Module) -> list[int] | None:
    w = getattr(module, "weight", None)
    return list(w.shape) if isinstance(w, torch.Tensor) else None


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= ATOL + RTOL * abs(y) for x, y in zip(a, b))


def compare_fingerprints(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The differences between a saved fingerprint and a model's, as readable sentences (empty: same model)."""
    problems = []
    for key, what in (
        ("model_type", "model type"),
        ("num_layers", "number of FFL layers"),
        ("num_hidden_layers", "config.num_hidden_layers"),
        ("vocab_size", "vocabulary size"),
        ("hidden_size", "hidden size"),
    ):
        if key in saved and saved[key] != current.get(key):
            problems.append(f"{what}: saved {saved[key]!r}, model has {current.get(key)!r}")
    saved_sites, cur_sites = saved.get("ffl_sites") or [], current.get("ffl_sites") or []
    if len(saved_sites) == len(cur_sites):
        for i, (s, c) in enumerate(zip(saved_sites, cur_sites)):
            for key, what in (("pre", "pre module"), ("key", "key module"), ("gate", "gate layout")):
                if s.get(key) != c.get(key):
                    problems.append(f"layer {i} FFL {what}: saved {s.get(key)!r}, model has {c.get(key)!r}")
            for key in ("d_ff", "pre_shape", "key_shape"):
                if s.get(key) != c.get(key):
                    problems.append(f"layer {i} FFL {key}: saved {s.get(key)!r}, model has {c.get(key)!r}")
                    break
    saved_w = {w.get("label"): w for w in saved.get("weights") or []}
    cur_w = {w.get("label"): w for w in current.get("weights") or []}
    for label, s in saved_w.items():
        c = cur_w.get(label)
        if c is None:
            problems.append(f"{label}: not found in the model")
            continue
        if s.get("shape") != c.get("shape"):
            problems.append(f"{label} shape: saved {s.get('shape')}, model has {c.get('shape')}")
            continue
        if s.get("sha256") is None or c.get("sha256") is None:
            logger.warning("Fingerprint: the values of the %s cannot be compared (not materialized).", label)
            continue
        if s["sha256"] == c["sha256"]:
            continue
        if s.get("dtype") != c.get("dtype") and _samples_close(c.get("sample"), s.get("sample")):
            logger.info(
                "Fingerprint: %s matches within %s-precision tolerance (saved %s, model %s).",
                label,
                c.get("dtype"),
                s.get("dtype"),
                c.get("dtype"),
            )
            continue
        problems.append(f"{label} ({s.get('name')}): the weight values differ")
    if saved.get("parameters") and current.get("parameters") is not None:
        problems += compare_parameters(saved["parameters"], current["parameters"])
    if not problems and saved.get("weights") and not _recorded_values(saved) & _recorded_values(current):
        if _recorded_values(saved):
            problems.append(
                "no weight values could be compared (the given model's weights are not materialized: a model built "
                "without weights), so nothing tells that it is the same base model"
            )
        else:  # an older save from a model whose weights were offloaded: it recorded none
            logger.warning(
                "Fingerprint: the saved fingerprint records no weight values (saved from a model whose weights were "
                "not materialized): only the architecture is checked. Re-save it to record them."
            )
    return problems


def _recorded_values(fingerprint: dict[str, Any]) -> set[tuple[str, str]]:
    """The weights whose values a fingerprint records: ``("slice", label)`` for a hashed weight slice,
    ``("parameter", name)`` for a parameter record with a hash."""
    slices = {
        ("slice", w.get("label")) for w in fingerprint.get("weights") or [] if w.get("sha256") is not None
    }
    return slices | {("parameter", r[0]) for r in fingerprint.get("parameters") or [] if r[3] is not None}


def check_fingerprint(
    saved: dict[str, Any], model: nn.Module, sites: list[FFLSite], *, ignore: bool = False, source: str = ""
) -> None:
    """Raise :class:`FingerprintMismatchError` listing the differences when ``model`` is not the saved base model.

    With ``ignore=True`` the differences are logged as a warning instead.
    """
    if not saved.get("weights") or not saved.get("ffl_sites"):
        logger.warning(
            "%s: the saved base-model fingerprint is %s: nothing can tell whether this is the base model the "
            "unlearning was fitted on. Attaching it anyway; re-save it with unlearn_hf to record a fingerprint.",
            source or "The unlearning",
            "empty" if not saved else "missing its weight or FFL-site records",
        )
    problems = compare_fingerprints(saved, compute_fingerprint(model, sites))
    if not problems:
        return
    listing = "; ".join(problems)
    if ignore:
        logger.warning(
            "Attaching %s despite base model differences (ignore_fingerprint=True): %s.", source, listing
        )
        return
    raise FingerprintMismatchError(
        f"The unlearning in {source} was fitted on another base model than the one given: {listing}. "
        "A model whose weights changed after loading (merged PEFT adapters, fine-tuning) is found again only when "
        "it was saved with save_base_model=True. "
        "Pass ignore_fingerprint=True to attach it anyway (only if you know the models are equivalent)."
    )
