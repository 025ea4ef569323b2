"""Saving, loading and sharing unlearned models (the format is described in ``FORMAT.md``).

- :func:`save_unlearned` (``model.save_pretrained``): ``unlearn_config.json`` + ``unlearn_model.safetensors``,
  optionally with the base model's own files (full layout), written atomically.
- :func:`load_unlearned` (``UnlearnedModelForCausalLM.from_pretrained``): from a folder or a Hub repo, or onto a
  model already in memory, with strict validation and a base-model fingerprint check.
- :func:`push_unlearned` (``model.push_to_hub``): upload with a model card.
"""

from . import atomic  # noqa: F401 - persistence.atomic: the crash-safe folder replacement
from .config_file import read_config
from .config_schema import UnlearnConfig
from .fingerprint import check_fingerprint, compare_fingerprints, compute_fingerprint
from .format import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, FingerprintMismatchError, UnlearnFormatError
from .hub import push_unlearned
from .load import load_unlearned
from .save import save_unlearned
from .weights_file import read_weights

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "FingerprintMismatchError",
    "UnlearnConfig",
    "UnlearnFormatError",
    "check_fingerprint",
    "compare_fingerprints",
    "compute_fingerprint",
    "load_unlearned",
    "push_unlearned",
    "read_config",
    "read_weights",
    "save_unlearned",
]
