"""The on-disk format of unlearned models: file names, format version, layouts, safetensors header metadata keys,
dtype names, and the errors raised for files that break it (see ``FORMAT.md`` at the repository root).

The readers (:func:`~.config_file.read_config`, :func:`~.weights_file.read_weights`) validate before they return:
a file that is missing, truncated, corrupted, written by a newer format version, or that is not what its name
claims (a pickle under a ``.safetensors`` name) raises :class:`UnlearnFormatError` naming the file and the
problem. Nothing is ever unpickled.
"""

from __future__ import annotations

import os

import torch

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


class UnlearnFormatError(ValueError):
    """A saved unlearned model is missing, corrupted, inconsistent, or from an unsupported format version."""


class FingerprintMismatchError(UnlearnFormatError):
    """The unlearning was fitted on another base model than the one it is being attached to."""


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` is written as a local path rather than a Hub repo id (``owner/name``): it starts with
    ``.``, ``/`` or ``~``, is absolute, holds a backslash, or has more than one ``/``. Existing folders are the
    caller's to check."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name)
