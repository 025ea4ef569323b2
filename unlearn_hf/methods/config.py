"""The base class of method configurations and the one set of validators every config uses."""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

#: Which tokens the neuron-level probes read (padding never counts).
NEURON_TOKEN_MODES = ("all", "prompt", "completion")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base class of method configurations: plain values only, serialisable to JSON, immutable once built (a
    fitted method shares its config with every model it is attached to; use ``dataclasses.replace`` for a
    variant).

    Subclasses set ``method_type`` and validate (and normalise, through :meth:`_set`) their fields in
    ``__post_init__``, with the validators of this module, so every config accepts and refuses values alike.
    """

    method_type: ClassVar[str] = ""

    def _set(self, name: str, value: Any) -> None:
        """Store a normalised value during ``__post_init__`` (the dataclass is frozen)."""
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        return {"method_type": self.method_type, **out}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MethodConfig:
        """Build a config from a dict; unknown keys are ignored with a warning (newer writers may add fields)."""
        values = dict(values)
        kind = values.pop("method_type", cls.method_type)
        if kind != cls.method_type:
            raise ValueError(f"Config of method {kind!r} given to {cls.__name__} ({cls.method_type!r}).")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            logger.warning("Ignoring unknown %s config keys: %s", cls.method_type, unknown)
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclasses.dataclass(frozen=True)
class NeuronSelectionConfig(MethodConfig):
    """Fields shared by the methods that select the top ``ratio`` of all neurons (Neuron Adjust, Selective
    Pruning): how many, which layers and tokens are probed, and how ``ratio="auto"`` chooses
    (:mod:`unlearn_hf.methods.ratio_search`).

    Args:
        ratio: fraction in (0, 1] of all neurons of all (chosen) layers, selected globally; the count is
            ``round(ratio * total)`` with halves rounded up, at least 1 (see
            :func:`unlearn_hf.methods.selection.selection_size`). ``"auto"``: the ratio of ``ratio_grid`` that lowers
            held-out forget accuracy most while lowering held-out retain accuracy by at most ``max_retain_drop``.
        tokens: which tokens are probed: ``"all"`` real tokens (padding never counts), or only the ``"prompt"``
            / ``"completion"`` part of prompt + completion pairs (needs ``prompt_column``/``completion_column``).
        layers: restrict probing and selection to these layer indices (negative ones count from the end;
            ``None`` = all layers).
        max_retain_drop: with ``ratio="auto"``, the largest relative drop of held-out retain accuracy allowed, in
            (0, 1).
        holdout_fraction: with ``ratio="auto"``, the share of the forget and of the retain examples held out of
            the fit to measure the drops, in (0, 1).
        ratio_grid: with ``ratio="auto"``, the ratios tried (default
            :data:`unlearn_hf.methods.ratio_search.DEFAULT_GRID`).
    """

    ratio: Any = 0.03
    tokens: str = "all"
    layers: list[int] | None = None
    max_retain_drop: float = 0.05
    holdout_fraction: float = 0.2
    ratio_grid: list[float] | None = None

    def __post_init__(self) -> None:
        self._set("ratio", auto_or("ratio", self.ratio, ratio))
        self._set("tokens", choice("tokens", self.tokens, NEURON_TOKEN_MODES))
        self._set("layers", layer_list("layers", self.layers))
        self._set("max_retain_drop", fraction("max_retain_drop", self.max_retain_drop))
        self._set("holdout_fraction", fraction("holdout_fraction", self.holdout_fraction))
        self._set("ratio_grid", ratio_grid("ratio_grid", self.ratio_grid))


# -- validators: each returns the normalised value or raises ValueError naming the field ------------------------
def positive_float(name: str, value: Any, hi: float | None = None) -> float:
    """A finite number > 0 and, with ``hi``, at most ``hi`` (``bool`` is refused: ``True`` is not a number a user
    meant)."""
    # any real number type (Python's, numpy's float32 / int64, ...); bool is refused
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r} ({type(value).__name__}).")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be in (0, {hi:g}], got {value!r}.")
    return float(value)


#: Upper bounds of the small positive constants: larger values are typos or corrupt files, and would make a
#: method do nothing (an ``eps`` floor above every standard deviation) or everything (an ``alpha`` of 1e308).
MAX_EPS = 1.0
MAX_ALPHA = 1e6


def ratio(name: str, value: Any) -> float:
    """A fraction in (0, 1]."""
    value = positive_float(name, value)
    if value > 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}.")
    return value


def fraction(name: str, value: Any) -> float:
    """A fraction in the open interval (0, 1) (a budget, a held-out share)."""
    value = positive_float(name, value)
    if not value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}.")
    return value


#: The value of a setting the method chooses itself on held-out data (``ratio="auto"``, ``alpha="auto"``).
AUTO = "auto"


def auto_or(name: str, value: Any, check) -> Any:
    """``"auto"``, or ``value`` checked by ``check(name, value)``."""
    return AUTO if value == AUTO else check(name, value)


def ratio_grid(name: str, value: Any) -> list[float] | None:
    """``None`` or a non-empty list of distinct fractions in (0, 1], normalised to a sorted list."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be None or a list of ratios in (0, 1], got {value!r}.")
    out = sorted(ratio(name, v) for v in value)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"{name} must be a non-empty list of distinct ratios, got {value!r}.")
    return out


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


def integer(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}.")
    return int(value)


def text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}.")
    return value


def layer_list(name: str, value: Any) -> list[int] | None:
    """``None``, an int or a non-empty list of ints, normalised to ``None`` or a list (ranges are checked against
    the model by :func:`resolve_layers`)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be None, an int or a list of ints, got {value!r}.")
    try:
        out = list(value)
    except TypeError:
        raise ValueError(f"{name} must be None, an int or a list of ints, got {value!r}.") from None
    try:
        if not out or any(isinstance(i, bool) for i in out):
            raise TypeError
        return [operator.index(i) for i in out]
    except TypeError:
        raise ValueError(f"{name} must be None or a non-empty list of ints, got {value!r}.") from None


def resolve_layers(layers: Sequence[int] | None, n: int) -> list[int]:
    """A config's ``layers`` resolved against a model with ``n`` FFL layers: ``None`` = all; negative indices
    count from the end; sorted, without repeats."""
    if layers is None:
        return list(range(n))
    out = []
    for i in layers:
        if not isinstance(i, int) or not -n <= i < n:
            raise ValueError(f"Layer {i!r} is out of range: this model has {n} FFL layers (0..{n - 1}).")
        out.append(i % n)
    if not out:
        raise ValueError("layers is empty.")
    return sorted(set(out))
