"""``unlearn_model.safetensors``: the keys of the fitted tensors, the header metadata, and the strict reader
(validated against ``unlearn_config.json`` before anything is loaded; never unpickles)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any

import torch

from .config_schema import UnlearnConfig
from .format import (
    CONFIG_NAME,
    DTYPE_NAMES,
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    META_FORMAT_VERSION,
    META_METHODS,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    UnlearnFormatError,
)

#: Largest total size of the fitted tensors a config may declare (bytes); checked before anything is read.
MAX_WEIGHTS_BYTES = 4 * 2**30
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def tensor_key(method_name: str, tensor_name: str) -> str:
    """Key of a fitted tensor in ``unlearn_model.safetensors``: ``<method_name>.<tensor_name>``."""
    return f"{method_name}.{tensor_name}"


def weights_metadata(config: UnlearnConfig) -> dict[str, str]:
    """The safetensors header metadata: format version and the methods' names and types, in attach order."""
    methods = [{"name": m.name, "method_type": m.method_type} for m in config.methods]
    return {
        "format": "pt",
        META_FORMAT_VERSION: str(config.format_version),
        META_METHODS: json.dumps(methods),
    }


def write_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` and the header ``metadata`` to ``path`` as safetensors, the same bytes for the same content.

    ``safetensors`` writes the metadata map in an order that changes from process to process, so saving the same
    fitted model twice gave two different files (and ``push_to_hub`` uploaded an unchanged file again): the header
    is written again here with the metadata's keys sorted (the tensors' entries and data are left as written)."""
    import safetensors.torch

    data = memoryview(safetensors.torch.save(tensors, metadata=metadata))
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(bytes(data[8 : 8 + size]))
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(data[8 + size :])


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
    src = str(path)
    declared = sum(
        math.prod(r.shape) * DTYPE_SIZES[r.dtype] for m in config.methods for r in m.tensors.values()
    )
    if declared > MAX_WEIGHTS_BYTES:
        raise UnlearnFormatError(
            f"{CONFIG_NAME} declares {declared} bytes of fitted tensors, over the {MAX_WEIGHTS_BYTES}-byte limit."
        )
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(9)
        # a safetensors header (JSON) starts at byte 8 with "{": the length before it may itself begin like a
        # pickle (640 = 0x280 is b"\x80\x02..."), so only a file without it is sniffed
        kind = _sniff_pickle(head) if head[8:9] != b"{" else None
        head = head[:8]
        f.seek(8)
        if kind is not None:
            raise UnlearnFormatError(
                f"{src} is {kind}, not a safetensors file: refused (unlearn_hf never unpickles; loading a pickle "
                "can run arbitrary code)."
            )
        if len(head) < 8:
            raise UnlearnFormatError(f"{src} is truncated: {size} bytes, shorter than a safetensors header.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise UnlearnFormatError(
                f"{src} is not a valid safetensors file (declared header length {header_len}, file size {size}): "
                "truncated or not safetensors."
            )
        header_bytes = f.read(header_len)
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise UnlearnFormatError(
                f"{src}: the safetensors header is corrupted (not valid JSON: {err})."
            ) from err
        if not isinstance(header, dict):
            raise UnlearnFormatError(f"{src}: the safetensors header is corrupted (not a JSON object).")
        metadata = header.pop("__metadata__", None) or {}
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
        spans = {key: _span(key, entry, expected[key][2], src) for key, entry in header.items()}
        body_len = size - 8 - header_len
        if any(end > body_len for _, end in spans.values()):
            raise UnlearnFormatError(
                f"{src} is truncated: a tensor ends past the {body_len}-byte data section."
            )
        if max((end for _, end in spans.values()), default=0) != body_len:
            raise UnlearnFormatError(
                f"{src}: the data section has {body_len} bytes but the tensors do not use them all (corrupted)."
            )
        # the checked sizes bound what is read; the bytes are hashed from a read-only map, then copied once
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else contextlib.nullcontext(b"") as mm:
            body = memoryview(mm)[8 + header_len :]
            tensors = {}
            try:
                for key, (start, end) in spans.items():
                    rec = expected[key][2]
                    if hashlib.sha256(body[start:end]).hexdigest() != rec.sha256:
                        raise UnlearnFormatError(
                            f"{src}: the bytes of tensor {key!r} do not match the sha256 recorded in {CONFIG_NAME} "
                            "(the file is corrupted, or the two files come from different saves)."
                        )
                    tensors[key] = _tensor(body[start:end], rec)
            finally:
                body.release()
    out: dict[str, dict[str, torch.Tensor]] = {m.name: {} for m in config.methods}
    for key, tensor in tensors.items():
        name, tname, _ = expected[key]
        out[name][tname] = tensor
    return out


def _span(key: str, entry: Any, rec: Any, src: str) -> tuple[int, int]:
    """The checked ``(start, end)`` byte offsets of one header entry, which must match its config record."""
    if not isinstance(entry, dict):
        raise UnlearnFormatError(f"{src}: header entry {key!r} is corrupted.")
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
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise UnlearnFormatError(f"{src}: tensor {key!r} has corrupted data offsets {offsets!r}.")
    if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise UnlearnFormatError(f"{src}: tensor {key!r}: data size does not match its shape and dtype.")
    return offsets[0], offsets[1]


def _tensor(data: memoryview, rec: Any) -> torch.Tensor:
    """A tensor owning a copy of ``data`` (little-endian, as safetensors stores it)."""
    dtype = TORCH_DTYPES[rec.dtype]
    if len(data) == 0:
        return torch.empty(rec.shape, dtype=dtype)
    out = torch.frombuffer(bytearray(data), dtype=dtype)
    if sys.byteorder == "big" and out.element_size() > 1:  # pragma: no cover - big-endian hosts
        out = out.view(torch.uint8).view(-1, out.element_size()).flip(1).contiguous().view(dtype).view(-1)
    return out.reshape(rec.shape)


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
