"""Fitting the methods named on the command line, exactly as the Python API does: one ``unlearned.fit`` per method,
in the order given, each on the model as it runs with the methods fitted before it attached."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ..methods.registry import by_short_name

logger = logging.getLogger(__name__)


def method_names() -> dict[str, str]:
    """``{short name: label}`` of every registered method (``na``: Neuron Adjust, ...)."""
    return {short: cls.label for short, cls in by_short_name().items()}


def check_options(methods: list[str], explicit: set[str]) -> None:
    """Refuse method options given on the command line (``explicit``) that none of ``methods`` takes, and a method
    named twice, before any model work.

    Raises:
        ValueError: naming the option, the methods asked for and the ones that take it.
    """
    registry = by_short_name()
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise ValueError(f"--method {twice[0]} is given twice; each method is fitted once.")
    for option in sorted(explicit):
        owners = [short for short, cls in registry.items() if option in cls.cli_options]
        if owners and not any(m in owners for m in methods):
            flag = "--" + option.replace("_", "-").replace("templates", "template")
            raise ValueError(
                f"{flag} does not apply to --method {', '.join(methods)}; it is an option of {', '.join(owners)}."
            )


def data_descriptions(
    forget: Any, retain: list[Any], n_probe: int, data_dir: str | None
) -> dict[str, str | None]:
    """``forget_data`` / ``retain_data`` for ``save_pretrained``: what a fit from skills read (the model card and
    ``push`` show them)."""
    where = f" ({data_dir})" if data_dir else ""
    names = ", ".join(s.name for s in retain)
    return {
        "forget_data": f"{n_probe} {forget.name} probe examples{where}",
        "retain_data": f"{n_probe} examples of {names}{where}" if retain else None,
    }


def retain_texts(retain: list[Any], n_probe: int) -> list[str]:
    """``n_probe`` retain texts, split evenly over the retain skills."""
    if not retain:
        return []
    per = max(1, n_probe // len(retain))
    return [t for skill in retain for t in skill.probe_texts(per)]


def method_config(short_name: str, options: dict[str, Any]) -> Any:
    """The config of method ``short_name`` from the CLI ``options`` that its class takes (``cli_options``); an
    option left at ``None`` keeps the config's default."""
    registry = by_short_name()
    if short_name not in registry:
        raise ValueError(f"Unknown method {short_name!r}; choose from {sorted(registry)}.")
    cls = registry[short_name]
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    kwargs = {k: options[k] for k in cls.cli_options if k in fields and options.get(k) is not None}
    return cls.config_class(**kwargs)


def fit_methods(
    unlearned: Any,
    tokenizer: Any,
    methods: list[str],
    forget: Any,
    retain: list[Any],
    *,
    n_probe: int = 200,
    batch_size: int | None = None,
    max_length: int = 512,
    max_batch_tokens: int | None = None,
    show_progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Fit ``methods`` (short names: ``na``, ``sp``, ``ksd``, ...) on ``unlearned`` in the order given and return
    ``{short name: fitted method}``.

    Each method is fitted with ``unlearned.fit`` on the model as it runs, with the methods fitted before it
    attached, as the API does: Key Space Detection fitted after Neuron Adjust describes the adjusted model's key
    vectors. Methods that fit on queries (Key Space Detection) read the forget skill's bare questions and, to
    calibrate, the retain skills' questions by skill; the others read question + answer texts.

    Args:
        options: CLI settings (``ratio``, ``alpha``, ``layers``, ``refusal``, ``seed``, ...); each method takes
            the ones its class lists in ``cli_options``.
    """
    registry = by_short_name()
    configs = {m: method_config(m, options) for m in methods}  # every config is checked before any probing
    if any(registry[m].needs_retain for m in methods) and not retain:
        needing = [registry[m].label for m in methods if registry[m].needs_retain]
        raise ValueError(f"{', '.join(needing)} need at least one retain skill.")
    abstaining = [m for m in methods if registry[m].fit_on == "queries"]
    later = (
        [m for m in methods[methods.index(abstaining[0]) + 1 :] if m not in abstaining] if abstaining else []
    )
    if later:
        logger.warning(
            "%s is fitted before %s: its hypercube describes the model without them (fit it last).",
            registry[abstaining[0]].label,
            ", ".join(registry[m].label for m in later),
        )
    forget_texts = forget.probe_texts(n_probe)
    retain_data = retain_texts(retain, n_probe)
    per = max(1, n_probe // len(retain)) if retain else 0
    retain_questions = {s.name: s.probe_questions(per) for s in retain} or None
    fitted = {}
    for m in methods:
        cls = registry[m]
        queries = cls.fit_on == "queries"
        fitted[m] = unlearned.fit(
            configs[m],
            forget.probe_questions(n_probe) if queries else forget_texts,
            retain_questions if queries else (retain_data if cls.needs_retain else None),
            tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            max_batch_tokens=max_batch_tokens,
            show_progress=show_progress,
        )
        logger.info("fitted %s: %s", cls.label, fitted[m].config)
    return fitted
