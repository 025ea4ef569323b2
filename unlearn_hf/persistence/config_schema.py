"""The schema of ``unlearn_config.json``: its dataclasses (:class:`UnlearnConfig`, :class:`BaseModelInfo`,
:class:`SavedMethod`, :class:`TensorRecord`), their JSON form, and the strict validation of a parsed file."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..sites import GATE_LAYOUTS
from .format import (
    CONFIG_NAME,
    DTYPE_NAMES,
    DTYPE_SIZES,
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYOUTS,
    UnlearnFormatError,
)

#: the logger of the format's readers (records keep the name they had before the format module was split)
logger = logging.getLogger("unlearn_hf.persistence.format")

_TOP_KEYS = {
    "format",
    "format_version",
    "library_version",
    "layout",
    "base_model",
    "methods",
    "forget_data",
    "retain_data",
    "companion_files",
}
_BASE_KEYS = {"name_or_path", "revision", "fingerprint"}
_METHOD_KEYS = {"name", "method_type", "config", "tensors", "fitted_with"}
_TENSOR_KEYS = {"dtype", "shape", "sha256"}


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a CPU tensor as safetensors stores them (row-major, little-endian)."""
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    if t.element_size() > 1 and not _LITTLE_ENDIAN:  # pragma: no cover - big-endian hosts
        raise RuntimeError("Saving unlearned models is only supported on little-endian machines.")
    return data


_LITTLE_ENDIAN = struct.pack("=H", 1) == struct.pack("<H", 1)


@dataclass(frozen=True)
class TensorRecord:
    """What ``unlearn_config.json`` records about one tensor: safetensors dtype name, shape and the sha256 of
    its bytes as stored in the file."""

    dtype: str
    shape: tuple[int, ...]
    sha256: str

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorRecord:
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"Tensors of dtype {tensor.dtype} cannot be saved.")
        return cls(
            DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), hashlib.sha256(tensor_bytes(tensor)).hexdigest()
        )

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "sha256": self.sha256}


@dataclass
class SavedMethod:
    """One attached method as saved: its name, type, config values and tensor records (attach order kept)."""

    name: str
    method_type: str
    config: dict[str, Any]
    tensors: dict[str, TensorRecord]
    #: digests of the activation-changing methods it was fitted after (``UnlearningMethod.fitted_with``)
    fitted_with: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "method_type": self.method_type,
            "config": self.config,
            "tensors": {k: r.to_dict() for k, r in self.tensors.items()},
        }
        if self.fitted_with is not None:
            out["fitted_with"] = list(self.fitted_with)
        return out


@dataclass
class BaseModelInfo:
    """The base model the unlearning was fitted on."""

    name_or_path: str | None
    revision: str | None
    fingerprint: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name_or_path": self.name_or_path, "revision": self.revision, "fingerprint": self.fingerprint}


@dataclass
class UnlearnConfig:
    """The content of ``unlearn_config.json``.

    Args:
        layout: ``"light"`` (base model resolved from ``base_model.name_or_path``) or ``"full"`` (the base model's
            own files are in the same folder).
        base_model: name, revision and fingerprint of the base model.
        methods: the attached methods, in attach order.
        forget_data / retain_data: optional free-text descriptions of the data used to fit.
        companion_files: other files this save wrote in the folder (the base model's and tokenizer's files);
            a later save into the same folder removes the ones it does not rewrite.
        library_version: ``unlearn_hf.__version__`` of the writer.
        format_version: :data:`FORMAT_VERSION` of the writer.
    """

    layout: str
    base_model: BaseModelInfo
    methods: list[SavedMethod]
    library_version: str
    forget_data: str | None = None
    retain_data: str | None = None
    companion_files: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "library_version": self.library_version,
            "layout": self.layout,
            "base_model": self.base_model.to_dict(),
            "methods": [m.to_dict() for m in self.methods],
            "forget_data": self.forget_data,
            "retain_data": self.retain_data,
            "companion_files": list(self.companion_files),
        }

    def to_json(self) -> str:
        """Indented JSON, with every short list (a shape, a sample, a fingerprint's parameter record) on one line."""
        # through json first: its rules for keys that are not strings (1 -> "1", None -> "null") and for NaN
        return _indented(json.loads(json.dumps(self.to_dict(), allow_nan=False)), 0) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = CONFIG_NAME) -> UnlearnConfig:
        """Validate and parse; raise :class:`UnlearnFormatError` naming ``source`` and the problem. Unknown keys
        are ignored with a warning (a newer writer of the same format version may add optional keys)."""

        def fail(msg: str) -> UnlearnFormatError:
            return UnlearnFormatError(f"{source}: {msg}")

        if not isinstance(data, dict):
            raise fail(f"expected a JSON object, got {type(data).__name__}.")
        if data.get("format") != FORMAT_NAME:
            raise fail(
                f"'format' is {data.get('format')!r}, expected {FORMAT_NAME!r}: not an unlearn_hf config."
            )
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise fail(f"'format_version' must be a positive integer, got {version!r}.")
        library_version = data.get("library_version")
        if version > FORMAT_VERSION:
            raise fail(
                f"written with format version {version} (unlearn_hf {library_version}); this unlearn_hf reads "
                f"format versions up to {FORMAT_VERSION}. Upgrade unlearn_hf to load it."
            )
        _warn_unknown(data, _TOP_KEYS, source, "top-level")
        if not isinstance(library_version, str):
            raise fail(f"'library_version' must be a string, got {library_version!r}.")
        layout = data.get("layout")
        if layout not in LAYOUTS:
            raise fail(f"'layout' must be one of {LAYOUTS}, got {layout!r}.")

        base = data.get("base_model")
        if not isinstance(base, dict):
            raise fail("'base_model' must be an object.")
        _warn_unknown(base, _BASE_KEYS, source, "base_model")
        for key in ("name_or_path", "revision"):
            if base.get(key) is not None and not isinstance(base[key], str):
                raise fail(f"'base_model.{key}' must be a string or null, got {base[key]!r}.")
        fingerprint = base.get("fingerprint")
        if not isinstance(fingerprint, dict):
            raise fail("'base_model.fingerprint' must be an object.")
        _check_fingerprint(fingerprint, fail)

        methods_raw = data.get("methods")
        if not isinstance(methods_raw, list) or not methods_raw:
            raise fail("'methods' must be a non-empty list.")
        methods: list[SavedMethod] = []
        for i, m in enumerate(methods_raw):
            methods.append(_parse_method(m, i, fail, source))
        names = [m.name for m in methods]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise fail(f"duplicate method names {dupes}.")

        for key in ("forget_data", "retain_data"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise fail(f"'{key}' must be a string or null, got {type(data[key]).__name__}.")
        companions = data.get("companion_files", [])
        if not isinstance(companions, list) or not all(
            isinstance(p, str) and _safe_relpath(p) for p in companions
        ):
            raise fail("'companion_files' must be a list of relative file paths inside the folder.")
        return cls(
            layout=layout,
            base_model=BaseModelInfo(base.get("name_or_path"), base.get("revision"), fingerprint),
            methods=methods,
            library_version=library_version,
            forget_data=data.get("forget_data"),
            retain_data=data.get("retain_data"),
            companion_files=companions,
            format_version=version,
        )


def _warn_unknown(values: dict, known: set[str], source: str, where: str) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        logger.warning(
            "%s: ignoring unknown %s keys %s (written by a newer unlearn_hf?).", source, where, unknown
        )


def _safe_relpath(path: str) -> bool:
    p = Path(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts and "\\" not in path


def _parse_method(m: Any, i: int, fail, source: str) -> SavedMethod:
    if not isinstance(m, dict):
        raise fail(f"methods[{i}] must be an object.")
    _warn_unknown(m, _METHOD_KEYS, source, f"methods[{i}]")
    name, kind, config, tensors = m.get("name"), m.get("method_type"), m.get("config"), m.get("tensors")
    if not isinstance(name, str) or not name:
        raise fail(f"methods[{i}].name must be a non-empty string, got {name!r}.")
    if not isinstance(kind, str) or not kind:
        raise fail(f"method {name!r}: 'method_type' must be a non-empty string, got {kind!r}.")
    if not isinstance(config, dict):
        raise fail(f"method {name!r}: 'config' must be an object.")
    if not isinstance(tensors, dict) or not tensors:
        raise fail(f"method {name!r}: 'tensors' must be a non-empty object.")
    records = {}
    for tname, rec in tensors.items():
        where = f"method {name!r}, tensor {tname!r}"
        if not isinstance(rec, dict):
            raise fail(f"{where}: record must be an object.")
        _warn_unknown(rec, _TENSOR_KEYS, source, where)
        dtype, shape, sha = rec.get("dtype"), rec.get("shape"), rec.get("sha256")
        if dtype not in DTYPE_SIZES:
            raise fail(f"{where}: unknown dtype {dtype!r}.")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise fail(f"{where}: shape must be a list of non-negative integers, got {shape!r}.")
        if not _is_sha(sha):
            raise fail(f"{where}: sha256 must be 64 lowercase hex digits, got {sha!r}.")
        records[tname] = TensorRecord(dtype, tuple(shape), sha)
    fitted_with = m.get("fitted_with")
    if fitted_with is not None and not (isinstance(fitted_with, list) and all(map(_is_sha, fitted_with))):
        raise fail(f"method {name!r}: 'fitted_with' must be a list of sha256 digests, got {fitted_with!r}.")
    return SavedMethod(name, kind, config, records, fitted_with)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_shape(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(d) for d in v)


def _is_sha(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _is_short(value: Any, depth: int = 2) -> bool:
    """A list of scalars (``depth`` 1), or of scalars and such lists (``depth`` 2): written on one line."""
    return isinstance(value, list) and all(
        not isinstance(v, (dict, list)) or (depth > 1 and _is_short(v, depth - 1)) for v in value
    )


def _indented(value: Any, level: int) -> str:
    """``json.dumps(value, indent=2)``, except that short lists (:func:`_is_short`) stay on one line."""
    if _is_short(value) or not isinstance(value, (dict, list)) or not value:
        return json.dumps(value, allow_nan=False)
    pad, inner = " " * level, " " * (level + 2)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {_indented(v, level + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    return "[\n" + ",\n".join(f"{inner}{_indented(v, level + 2)}" for v in value) + f"\n{pad}]"


def _finite_number(x: Any) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an integer beyond float's range
        return False


def _finite_numbers(v: Any) -> bool:
    return isinstance(v, list) and all(_finite_number(x) for x in v)


#: The fingerprint's fields and what each must be (every field is optional; present ones must match).
_FINGERPRINT_FIELDS = {
    "model_type": (lambda v: isinstance(v, str), "a string"),
    "num_layers": (_is_int, "a non-negative integer"),
    "num_hidden_layers": (lambda v: v is None or _is_int(v), "a non-negative integer or null"),
    "vocab_size": (lambda v: v is None or _is_int(v), "a non-negative integer or null"),
    "hidden_size": (lambda v: v is None or _is_int(v), "a non-negative integer or null"),
}
_SITE_FIELDS = {
    "pre": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "key": (lambda v: isinstance(v, str), "a string"),
    "gate": (lambda v: v is None or v in GATE_LAYOUTS, f"one of {', '.join(GATE_LAYOUTS)} or null"),
    "d_ff": (_is_int, "a non-negative integer"),
    "pre_shape": (lambda v: v is None or _is_shape(v), "a list of non-negative integers or null"),
    "key_shape": (_is_shape, "a list of non-negative integers"),
}
_WEIGHT_FIELDS = {
    "label": (lambda v: isinstance(v, str), "a string"),
    "name": (lambda v: isinstance(v, str), "a string"),
    "shape": (_is_shape, "a list of non-negative integers"),
    "dtype": (lambda v: isinstance(v, str), "a string"),
    "rows": (_is_int, "a non-negative integer"),
    "sha256": (lambda v: v is None or _is_sha(v), "64 lowercase hex digits or null"),
    "sample": (lambda v: v is None or _finite_numbers(v), "a list of finite numbers or null"),
}


def _check_fields(values: Any, fields: dict, where: str, fail) -> None:
    if not isinstance(values, dict):
        raise fail(f"{where} must be an object, got {type(values).__name__}.")
    for key, (ok, what) in fields.items():
        if key in values and not ok(values[key]):
            raise fail(f"{where}.{key} must be {what}, got {values[key]!r:.80}.")


def _is_parameter_record(v: Any) -> bool:
    """``[name, dtype, shape, hash, sample]`` (see :func:`unlearn_hf.persistence.fingerprint.parameter_records`)."""
    if not (isinstance(v, list) and len(v) == 5 and isinstance(v[0], str) and isinstance(v[1], str)):
        return False
    shape, digest, sample = v[2], v[3], v[4]
    if not _is_shape(shape) or (sample is not None and not _finite_numbers(sample)):
        return False
    if digest is None:
        return sample is None
    return isinstance(digest, str) and len(digest) == 16 and all(c in "0123456789abcdef" for c in digest)


def _check_fingerprint(fp: dict, fail) -> None:
    """Validate the fingerprint's schema, so that comparing it with a model cannot fail on junk."""
    where = "'base_model.fingerprint'"
    _check_fields(fp, _FINGERPRINT_FIELDS, where, fail)
    records = fp.get("parameters", [])
    if not isinstance(records, list):
        raise fail(f"{where}.parameters must be a list, got {type(records).__name__}.")
    for i, record in enumerate(records):
        if not _is_parameter_record(record):
            raise fail(
                f"{where}.parameters[{i}] must be [name, dtype, shape, 16 hex digits or null, finite numbers or null], got {record!r:.80}."
            )
    for key, fields in (("ffl_sites", _SITE_FIELDS), ("weights", _WEIGHT_FIELDS)):
        entries = fp.get(key, [])
        if not isinstance(entries, list):
            raise fail(f"{where}.{key} must be a list, got {type(entries).__name__}.")
        for i, entry in enumerate(entries):
            _check_fields(entry, fields, f"{where}.{key}[{i}]", fail)
