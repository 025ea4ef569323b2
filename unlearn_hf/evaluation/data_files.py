"""Reading skill data: the files of a local data folder, or the rows of a Hugging Face Hub data set.

A local folder is laid out like the project's ``shared/data/<name>`` copies; the ``data_dir`` a user passes
may be the folder of all skills or the skill's own folder (:func:`local_folder` finds the right one).
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .skill_specs import SkillSpec

logger = logging.getLogger(__name__)


def local_folder(spec: SkillSpec, data_dir: Path, required: Sequence[str]) -> Path:
    """The folder under ``data_dir`` that contains all ``required`` relative paths of the skill ``spec``."""
    root = data_dir
    candidates = [root / spec.folder, root]
    if spec.folder == "mlqa":
        candidates = [root / "mlqa" / "dev", root / "dev", root]
    for base in candidates:
        if all((base / rel).exists() for rel in required):
            return base
    raise FileNotFoundError(
        f"Skill {spec.name!r}: could not find {list(required)} in {[str(c) for c in candidates]}. Pass the "
        f"folder of all skills or the skill's own folder as data_dir, or data_dir=None to load "
        f"{spec.hub_path!r} from the Hugging Face Hub."
    )


def hub_rows(spec: SkillSpec, split: str, config: str | None = None) -> list[dict[str, Any]]:
    """The rows of ``split`` of the skill's Hub data set (``config`` defaults to the spec's)."""
    import datasets

    config = config if config is not None else spec.hub_config
    logger.info("Loading %s (%s, split %s) from the Hugging Face Hub", spec.hub_path, config, split)
    ds = datasets.load_dataset(spec.hub_path, config, split=split)
    return ds.to_list() if hasattr(ds, "to_list") else [dict(r) for r in ds]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a ``.jsonl`` or ``.jsonl.gz`` file."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV file with a header line."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def check_columns(rows: Iterable[Mapping[str, Any]], required: Sequence[str], source: str) -> None:
    """Raise ``KeyError`` naming the first row of ``source`` that lacks one of the ``required`` columns."""
    for i, row in enumerate(rows):
        missing = [c for c in required if c not in row]
        if missing:
            raise KeyError(f"{source}: row {i} has no column(s) {missing}; available columns: {sorted(row)}.")


def unix_newlines(text: str) -> str:
    """``text`` with ``\\r\\n`` and ``\\r`` line ends turned into ``\\n``."""
    return text.replace("\r\n", "\n").replace("\r", "\n")
