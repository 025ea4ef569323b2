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


def ratio_list(text: str) -> list[float]:
    """An argparse type: comma-separated distinct fractions in (0, 1] (``--ratio-grid 0.01,0.03,0.1``)."""
    parse = number(float, 0, 1, open_low=True)
    values = [parse(v.strip()) for v in text.split(",") if v.strip()]
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated ratios, got {text!r}")
    return sorted(values)


POSITIVE_INT = number(int, 1)


def add_ratio_options(p: argparse.ArgumentParser) -> None:
    """``--ratio``, ``--max-retain-drop`` and ``--ratio-grid`` (Neuron Adjust and Selective Pruning) of ``fit`` and
    ``demo``."""
    p.add_argument(
        "--ratio",
        type=ratio_or_auto,
        default="auto",
        help="fraction of neurons for na/sp, or 'auto' (default): the ratio of --ratio-grid with the largest forget "
        "drop within --max-retain-drop on held-out examples",
    )
    p.add_argument(
        "--max-retain-drop",
        type=FRACTION,
        default=None,
        help="na/sp with --ratio auto: largest relative drop of held-out retain accuracy (0.05)",
    )
    p.add_argument(
        "--ratio-grid",
        type=ratio_list,
        default=None,
        help="na/sp with --ratio auto: comma-separated ratios to try, e.g. 0.01,0.03,0.1 (default: "
        "unlearn_hf.methods.ratio_search.DEFAULT_GRID)",
    )


def ratio_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of :func:`add_ratio_options` as ``fit_methods`` takes them."""
    return {"ratio": args.ratio, "max_retain_drop": args.max_retain_drop, "ratio_grid": args.ratio_grid}


def check_retain_budget(args: argparse.Namespace) -> None:
    """``--max-retain-drop`` and ``--ratio-grid`` set up ``--ratio auto`` only: with a fixed ratio they would be
    silently ignored."""
    for flag, value in (("--max-retain-drop", args.max_retain_drop), ("--ratio-grid", args.ratio_grid)):
        if value is not None and args.ratio != "auto":
            raise UserError(
                f"{flag} applies to --ratio auto only; --ratio {args.ratio} is fixed (drop one of them)."
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
