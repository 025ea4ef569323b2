"""Reading skill data: the files of a local data folder, or the rows of a Hugging Face Hub data set.

A local folder is laid out like the project's ``shared/data/<name>`` copies; the ``data_dir`` a user passes
may be the folder of all skills or the skill's own folder (:func:`local_folder` finds the right one).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import stat
import zlib
from collections.abc import Iterable, Mapping, Sequence
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


#: Largest data file read (bytes); larger files are refused before reading.
MAX_DATA_FILE_BYTES = 2 * 2**30


class DataFileError(ValueError):
    """A data file that cannot be read as what it claims to be: not a regular file, too large, not UTF-8, bad
    JSON/CSV. The message names the file (and the line)."""


def check_data_file(path: Path, max_bytes: int = MAX_DATA_FILE_BYTES) -> None:
    """Refuse, before reading, what is not a regular file (a FIFO would block, a folder fails later) or is too
    large."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist.") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataFileError(f"{path} is not a regular file.")
    if st.st_size > max_bytes:
        raise DataFileError(f"{path} is {st.st_size} bytes, over the {max_bytes}-byte limit for data files.")


def read_text(path: Path) -> str:
    """The text of a (``.gz``-compressed) UTF-8 data file, checked first (:func:`check_data_file`)."""
    check_data_file(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read(MAX_DATA_FILE_BYTES + 1)
            if len(raw) > MAX_DATA_FILE_BYTES:
                raise DataFileError(f"{path} decompresses to more than {MAX_DATA_FILE_BYTES} bytes.")
        else:
            raw = path.read_bytes()
        return raw.decode("utf-8-sig")  # a leading byte-order mark (Excel's "CSV UTF-8") is not data
    except UnicodeDecodeError as err:
        raise DataFileError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}).") from None
    except zlib.error as err:
        raise DataFileError(f"{path} is a corrupt gzip file ({err}).") from None
    except (OSError, EOFError) as err:
        if isinstance(err, DataFileError):
            raise
        raise DataFileError(f"{path} cannot be read: {err}") from None


def read_json(path: Path) -> Any:
    """The document of a JSON file."""
    try:
        return json.loads(read_text(path))
    except RecursionError:
        raise DataFileError(f"{path}: nested too deeply to be a data file.") from None
    except json.JSONDecodeError as err:
        raise DataFileError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}."
        ) from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records (JSON objects) of a ``.jsonl`` or ``.jsonl.gz`` file."""
    rows = []
    # records end at a line break ("\n", "\r\n", "\r": raw inside a JSON string they are invalid) and at nothing
    # else: strings may hold U+2028, U+0085... at which str.splitlines() would also cut
    for n, line in enumerate(unix_newlines(read_text(path)).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(f"{path}: line {n} is not valid JSON ({err.msg}).") from None
        except RecursionError:
            raise DataFileError(f"{path}: line {n} is nested too deeply to be a data record.") from None
        if not isinstance(row, dict):
            raise DataFileError(f"{path}: line {n} is a JSON {type(row).__name__}, not an object.")
        rows.append(row)
    return rows


def read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV file with a header line."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    rows = []
    try:
        for row in reader:
            if None in row or None in row.values():  # more fields than the header names, or fewer
                n = len(reader.fieldnames or ())
                got = n + len(row.get(None, ())) - sum(v is None for k, v in row.items() if k is not None)
                raise DataFileError(
                    f"{path}: line {reader.line_num} has {got} fields, the header names {n} (a cut or unquoted row?)."
                )
            rows.append(row)
    except csv.Error as err:
        raise DataFileError(f"{path}: invalid CSV: {err}.") from None
    return rows


def check_columns(
    rows: Iterable[Mapping[str, Any]], required: Sequence[str], source: str, text: Sequence[str] = ()
) -> None:
    """Raise ``KeyError`` naming the first row of ``source`` that lacks one of the ``required`` columns, and
    :class:`DataFileError` for the first whose ``text`` columns do not hold text (an empty answer would be scored
    on nothing: its item would count as wrong, or as right, for no reason)."""
    for i, row in enumerate(rows):
        missing = [c for c in required if c not in row]
        if missing:
            raise KeyError(f"{source}: row {i} has no column(s) {missing}; available columns: {sorted(row)}.")
        for c in text:
            if not isinstance(row[c], str):
                raise DataFileError(
                    f"{source}: row {i}, column {c!r} must be text, got {type(row[c]).__name__}."
                )
            if not row[c].strip():
                raise DataFileError(f"{source}: row {i}, column {c!r} is empty.")


def unix_newlines(text: str) -> str:
    """``text`` with ``\\r\\n`` and ``\\r`` line ends turned into ``\\n``."""
    return text.replace("\r\n", "\n").replace("\r", "\n")
