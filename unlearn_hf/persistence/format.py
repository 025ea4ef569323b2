"""The on-disk format of unlearned models: file names, format version, ``unlearn_config.json`` and the strict
reader of ``unlearn_model.safetensors`` (see ``FORMAT.md`` at the repository root).

Every reader here validates before it returns: a file that is missing, truncated, corrupted, written by a newer
format version, or that is not what its name claims (a pickle under a ``.safetensors`` name) raises
:class:`UnlearnFormatError` naming the file and the problem. Nothing is ever unpickled.
"""

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

logger = logging.getLogger(__name__)

#: The unlearning configuration (JSON). Never clashes with the base model's ``config.json``.
CONFIG_NAME = "unlearn_config.json"
#: The fitted tensors of every method (safetensors). Never clashes with the base model's ``model.safetensors``.
WEIGHTS_NAME = "unlearn_model.safetensors"
#: Value of the ``"format"`` key of ``unlearn_config.json``.
FORMAT_NAME = "unlearn_hf"
#: Version of the format written by this library; readers refuse files with a larger version.
FORMAT_VERSION = 1
#: Checkpoint layouts: unlearning files only (base model resolved by name), or base model files included.
LAYOUT_LIGHT = "light"
LAYOUT_FULL = "full"
LAYOUTS = (LAYOUT_LIGHT, LAYOUT_FULL)
#: Keys of the safetensors header metadata.
META_FORMAT_VERSION = "unlearn_hf.format_version"
META_METHODS = "unlearn_hf.methods"
#: Suffixes of pickle-based checkpoint files. Such files are refused, never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: Largest safetensors header accepted (the format's own limit is 100 MB).
MAX_HEADER_BYTES = 100_000_000

#: torch dtype <-> safetensors dtype name.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

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
_METHOD_KEYS = {"name", "method_type", "config", "tensors"}
_TENSOR_KEYS = {"dtype", "shape", "sha256"}


class UnlearnFormatError(ValueError):
    """A saved unlearned model is missing, corrupted, inconsistent, or from an unsupported format version."""


class FingerprintMismatchError(UnlearnFormatError):
    """The unlearning was fitted on another base model than the one it is being attached to."""


# -- tensors ---------------------------------------------------------------------------------------------------
def tensor_key(method_name: str, tensor_name: str) -> str:
    """Key of a fitted tensor in ``unlearn_model.safetensors``: ``<method_name>.<tensor_name>``."""
    return f"{method_name}.{tensor_name}"


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


# -- unlearn_config.json ---------------------------------------------------------------------------------------
@dataclass
class SavedMethod:
    """One attached method as saved: its name, type, config values and tensor records (attach order kept)."""

    name: str
    method_type: str
    config: dict[str, Any]
    tensors: dict[str, TensorRecord]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method_type": self.method_type,
            "config": self.config,
            "tensors": {k: r.to_dict() for k, r in self.tensors.items()},
        }


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
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

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
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise fail(f"{where}: sha256 must be 64 lowercase hex digits, got {sha!r}.")
        records[tname] = TensorRecord(dtype, tuple(shape), sha)
    return SavedMethod(name, kind, config, records)


def read_config(folder: Path) -> UnlearnConfig:
    """Read and validate ``folder / unlearn_config.json``."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        found = sorted(p.name for p in Path(folder).iterdir()) if Path(folder).is_dir() else []
        hint = ""
        if (Path(folder) / "config.json").is_file():
            hint = " It looks like a plain transformers model folder: load it with AutoModelForCausalLM."
        raise UnlearnFormatError(
            f"No {CONFIG_NAME} in {folder}: it holds no saved unlearning (files: {found[:12]}).{hint}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise UnlearnFormatError(f"{path}: not valid JSON ({err}).") from err
    return UnlearnConfig.from_dict(data, str(path))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


# -- unlearn_model.safetensors ---------------------------------------------------------------------------------
def weights_metadata(config: UnlearnConfig) -> dict[str, str]:
    """The safetensors header metadata: format version and the methods' names and types, in attach order."""
    methods = [{"name": m.name, "method_type": m.method_type} for m in config.methods]
    return {
        "format": "pt",
        META_FORMAT_VERSION: str(config.format_version),
        META_METHODS: json.dumps(methods),
    }


def _sniff_pickle(head: bytes) -> str | None:
    """Name the container when ``head`` starts like a pickle-based file."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (the format of torch.save)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    return None


def read_weights(folder: Path, config: UnlearnConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Read ``folder / unlearn_model.safetensors`` strictly and return ``{method_name: {tensor_name: tensor}}``.

    Checks, in order: the file exists (a pickle-based sibling such as ``unlearn_model.bin`` is refused by name);
    it is a safetensors file (not a pickle / zip); the header is valid JSON and the data section has exactly the
    size the header declares (truncation); the header metadata matches the config's format version and methods;
    the tensors are exactly the ones the config lists, with its dtypes and shapes; every tensor's bytes have the
    sha256 the config recorded (bit flips). Never unpickles anything.
    """
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickled = sorted(p.name for p in folder.glob("unlearn_model.*") if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise UnlearnFormatError(
                f"{folder} has {pickled} but no {WEIGHTS_NAME}: pickle-based files are refused (unlearn_hf never "
                "unpickles, loading a pickle can run arbitrary code). Re-save the model with unlearn_hf."
            )
        raise UnlearnFormatError(
            f"{path} is missing: the folder has {CONFIG_NAME} but not the fitted tensors."
        )
    data = path.read_bytes()
    src = str(path)
    kind = _sniff_pickle(data[:8])
    if kind is not None:
        raise UnlearnFormatError(
            f"{src} is {kind}, not a safetensors file: refused (unlearn_hf never unpickles; loading a pickle can "
            "run arbitrary code)."
        )
    if len(data) < 8:
        raise UnlearnFormatError(f"{src} is truncated: {len(data)} bytes, shorter than a safetensors header.")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise UnlearnFormatError(
            f"{src} is not a valid safetensors file (declared header length {header_len}, file size {len(data)}): "
            "truncated or not safetensors."
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnlearnFormatError(
            f"{src}: the safetensors header is corrupted (not valid JSON: {err})."
        ) from err
    if not isinstance(header, dict):
        raise UnlearnFormatError(f"{src}: the safetensors header is corrupted (not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + header_len :]
    _check_metadata(metadata, config, src)

    expected = {
        tensor_key(m.name, t): (m.name, t, rec) for m in config.methods for t, rec in m.tensors.items()
    }
    if len(expected) != sum(len(m.tensors) for m in config.methods):
        raise UnlearnFormatError(f"{CONFIG_NAME}: two methods' tensors map to the same safetensors key.")
    missing = sorted(set(expected) - set(header))
    if missing:
        raise UnlearnFormatError(f"{src} is missing tensors listed in {CONFIG_NAME}: {missing}.")
    extra = sorted(set(header) - set(expected))
    if extra:
        raise UnlearnFormatError(f"{src} holds tensors that {CONFIG_NAME} does not list: {extra}.")

    end_max = 0
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise UnlearnFormatError(f"{src}: header entry {key!r} is corrupted.")
        _, _, rec = expected[key]
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype != rec.dtype:
            raise UnlearnFormatError(
                f"{src}: tensor {key!r} has dtype {dtype}, {CONFIG_NAME} records {rec.dtype}."
            )
        if not isinstance(shape, list) or tuple(shape) != rec.shape:
            raise UnlearnFormatError(
                f"{src}: tensor {key!r} has shape {shape}, {CONFIG_NAME} records {list(rec.shape)}."
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise UnlearnFormatError(f"{src}: tensor {key!r} has corrupted data offsets {offsets!r}.")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise UnlearnFormatError(f"{src}: tensor {key!r}: data size does not match its shape and dtype.")
        if offsets[1] > len(body):
            raise UnlearnFormatError(
                f"{src} is truncated: tensor {key!r} ends at byte {offsets[1]} of a {len(body)}-byte data section."
            )
        end_max = max(end_max, offsets[1])
        digest = hashlib.sha256(body[offsets[0] : offsets[1]]).hexdigest()
        if digest != rec.sha256:
            raise UnlearnFormatError(
                f"{src}: the bytes of tensor {key!r} do not match the sha256 recorded in {CONFIG_NAME} "
                "(the file is corrupted, or the two files come from different saves)."
            )
    if end_max != len(body):
        raise UnlearnFormatError(
            f"{src}: the data section has {len(body)} bytes but the tensors use {end_max} (corrupted or appended)."
        )

    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        flat = load_safetensors(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise UnlearnFormatError(f"{src}: not a valid safetensors file ({err}).") from err
    out: dict[str, dict[str, torch.Tensor]] = {m.name: {} for m in config.methods}
    for key, tensor in flat.items():
        name, tname, _ = expected[key]
        out[name][tname] = tensor
    return out


def _check_metadata(metadata: Any, config: UnlearnConfig, src: str) -> None:
    if not isinstance(metadata, dict) or META_FORMAT_VERSION not in metadata:
        raise UnlearnFormatError(
            f"{src}: the header metadata lacks {META_FORMAT_VERSION!r}: not an unlearn_hf file."
        )
    version = metadata[META_FORMAT_VERSION]
    if version != str(config.format_version):
        raise UnlearnFormatError(
            f"{src}: format version {version} in the header, {config.format_version} in {CONFIG_NAME}: the two "
            "files come from different saves."
        )
    try:
        methods = json.loads(metadata.get(META_METHODS, ""))
    except json.JSONDecodeError as err:
        raise UnlearnFormatError(f"{src}: header metadata {META_METHODS!r} is corrupted ({err}).") from err
    expected = [{"name": m.name, "method_type": m.method_type} for m in config.methods]
    if methods != expected:
        raise UnlearnFormatError(
            f"{src}: the header lists methods {methods}, {CONFIG_NAME} lists {expected}: the two files come from "
            "different saves."
        )
