"""Command-line values: the parser whose errors are one line, argparse types that check ranges, and the output
paths of ``fit``/``demo`` (a folder) and ``evaluate`` (a file)."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, NoReturn

from .common import UserError

DEFAULT_DATA = "../shared/data"
N_PROBE_HELP = "probe examples of the forget skill, and of the retain skills together (split evenly)"


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and results; no progress bars")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help="local folder of skill data sets (e.g. ../shared/data); without it skills load from the Hub",
    )


class Parser(argparse.ArgumentParser):
    """Argument errors in one line (``unlearn-hf fit: error: ...``), exit code 2, as every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind: type, low: float | None = None, high: float | None = None, *, open_low: bool = False) -> Any:
    """An argparse type: a ``kind`` number within ``[low, high]`` (``(low, high]`` with ``open_low``), finite."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        too_low = low is not None and (value <= low if open_low else value < low)
        if too_low or (high is not None and value > high):
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if open_low else '['}{lo}, {hi}], got {text!r}"
            )
        return value

    return parse


def ratio_or_auto(text: str) -> Any:
    """An argparse type: ``auto`` or a fraction in (0, 1]."""
    return "auto" if text == "auto" else number(float, 0, 1, open_low=True)(text)


POSITIVE_INT = number(int, 1)


def check_retain_budget(args: argparse.Namespace) -> None:
    """``--max-retain-drop`` budgets ``--ratio auto`` only: with a fixed ratio it would be silently ignored."""
    if args.max_retain_drop is not None and args.ratio != "auto":
        raise UserError(
            f"--max-retain-drop applies to --ratio auto only; --ratio {args.ratio} is fixed (drop one of them)."
        )


def output_folder(path: str) -> Path:
    """``--output`` of ``fit``/``demo``: a folder (new or existing), not a file."""
    if not path.strip():
        raise UserError("--output is empty: give the folder to write.")
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {path!r} exists and is not a folder.")
    # a save replaces the folder: a shell standing in it (or below it) would be left in a deleted folder
    cwd = Path.cwd().resolve()
    if out.resolve() in (cwd, *cwd.parents):
        raise UserError(f"--output {path!r} is the current folder or holds it; give a folder of its own.")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--output {path!r}: {parent} is not a folder.")
            break
    check_writable(path, out)  # a save writes beside the folder (a link's target), then swaps it in
    return out


def check_writable(path: str, out: Path) -> None:
    """Refuse, before any work, an ``--output`` ``out`` whose nearest existing parent folder (links resolved) this
    process cannot write to (a read-only file system, no permission): the error came after the whole fit or
    evaluation."""
    folder = next(p for p in out.resolve().parents if p.exists())
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--output {path!r}: cannot write into {folder} (read-only or no permission).")


def output_file(path: str | None) -> Path | None:
    """``--output`` of ``evaluate``: a JSON file to write, not a folder."""
    if path is None:
        return None
    out = Path(path).expanduser()
    if out.is_dir():
        raise UserError(f"--output {path!r} is a folder; give a file name (e.g. results.json).")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # found now, not after the whole evaluation
        raise UserError(f"--output {path!r}: {str(blocking)!r} is a file, not a folder.")
    if out.exists():  # rewritten in place
        if not os.access(out, os.W_OK):
            raise UserError(f"--output {path!r}: the file cannot be written (read-only or no permission).")
    else:
        check_writable(path, out)
    return out


def FRACTION(text: str) -> float:  # noqa: N802 (an argparse type, named like the other constants here)
    """An argparse type: a number in the open interval (0, 1) (a budget)."""
    value = number(float)(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text!r}")
    return value
