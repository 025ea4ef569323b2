"""Reading ``unlearn_config.json``: strict JSON (no ``NaN``/``Infinity``), then the schema's validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config_schema import UnlearnConfig
from .format import CONFIG_NAME, UnlearnFormatError

#: Largest ``unlearn_config.json`` read (bytes), and its deepest nesting (the real format needs 6 levels).
MAX_CONFIG_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32


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
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UnlearnFormatError(
            f"{path} is {size} bytes, over the {MAX_CONFIG_BYTES}-byte limit of a config."
        )
    try:
        text = path.read_text(encoding="utf-8")
        depth = json_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested {depth} levels deep, more than the {MAX_JSON_DEPTH} a config can need")
        data = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as err:
        raise UnlearnFormatError(f"{path}: not valid JSON ({err}).") from err
    return UnlearnConfig.from_dict(data, str(path))


def json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in the JSON ``text`` (brackets inside strings do not count); one linear
    pass, so that a hostile file is refused before the recursive parser sees it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")
