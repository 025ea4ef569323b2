"""The registry of unlearning methods: every method folder under :mod:`unlearn_hf.methods` registers itself, and
so do installed packages that declare an ``unlearn_hf.methods`` entry point. The CLI, the demo, the model card
and loading read it; nothing keeps a list of methods of its own.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Mapping
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import Any

from .base import UnlearningMethod
from .config import MethodConfig

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "unlearn_hf.methods"

_METHODS: dict[str, type[UnlearningMethod]] = {}
#: method_type -> method class (read-only view of the registry).
METHOD_CLASSES: Mapping[str, type[UnlearningMethod]] = MappingProxyType(_METHODS)
_discovered = False


def register_method(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    """Class decorator registering a method under its config's ``method_type`` and its ``short_name``.

    Raises:
        ValueError: the class lacks a ``method_type``, ``short_name`` or ``label``, or another class is registered
            under the same ``method_type`` or ``short_name``.
    """
    kind = getattr(getattr(cls, "config_class", None), "method_type", "")
    for attr, value in (
        ("config_class.method_type", kind),
        ("short_name", cls.short_name),
        ("label", cls.label),
    ):
        if not value:
            raise ValueError(f"{cls.__name__} cannot be registered: it has no {attr}.")
    for other in _METHODS.values():
        if other is cls or _same_class(other, cls):
            continue
        if other.config_class.method_type == kind or other.short_name == cls.short_name:
            raise ValueError(
                f"Cannot register {cls.__module__}.{cls.__qualname__}: {other.__module__}.{other.__qualname__} is "
                f"already registered as {other.config_class.method_type!r} ({other.short_name!r})."
            )
    _METHODS.pop(next((k for k, c in _METHODS.items() if _same_class(c, cls)), None), None)
    _METHODS[kind] = cls
    return cls


def _same_class(a: type, b: type) -> bool:
    """The same class defined again (a module reloaded), not a different method."""
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def discover() -> None:
    """Import every method folder of :mod:`unlearn_hf.methods` and every ``unlearn_hf.methods`` entry point
    (each registers its methods on import). Runs once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            importlib.import_module(f"{__package__}.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken plug-in must not break the library
            logger.warning("Could not load unlearning method plug-in %s: %s", ep.value, err)


def method_class(method_type: str) -> type[UnlearningMethod]:
    """The class registered under ``method_type``."""
    discover()
    if method_type not in _METHODS:
        raise ValueError(f"Unknown method_type {method_type!r}; known: {sorted(_METHODS)}.")
    return _METHODS[method_type]


def by_short_name() -> dict[str, type[UnlearningMethod]]:
    """``{short_name: class}`` of every registered method: the methods that change activations first, then the
    abstaining ones (the order in which to fit them: an abstaining method describes the model it is fitted on),
    each group in registration order."""
    discover()
    ordered = sorted(_METHODS.values(), key=lambda cls: cls.fit_on == "queries")
    return {cls.short_name: cls for cls in ordered}


def config_from_dict(values: dict[str, Any]) -> MethodConfig:
    """Build the right config class from a dict with a ``method_type`` key."""
    return method_class(values.get("method_type")).config_class.from_dict(values)
