"""Reading ``unlearn_config.json``: strict JSON (no ``NaN``/``Infinity``), then the schema's validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config_schema import UnlearnConfig
from .format import CONFIG_NAME, UnlearnFormatError


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
