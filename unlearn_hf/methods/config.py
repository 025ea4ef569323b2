"""The base class of method configurations and the one set of validators every config uses."""

from __future__ import annotations

import dataclasses
import logging
import math
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


# -- validators: each returns the normalised value or raises ValueError naming the field ------------------------
def positive_float(name: str, value: Any, hi: float | None = None) -> float:
    """A finite number > 0 and, with ``hi``, at most ``hi`` (``bool`` is refused: ``True`` is not a number a user
    meant)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
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


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


def integer(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
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
