"""GSM8K exact match: the final number of a generated answer against the ``#### n`` of the reference."""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from .items import EvalItem
from .results import MetricResult

#: A number, its minus sign only where no digit precedes it (``2019-2020`` and ``12 - 4`` end in 2020 and 4: a
#: range or a subtraction, not a negative number); ``.5`` is 0.5 (it was read as 5, matching a gold 5).
_NUMBER = re.compile(r"(?:(?<!\d)(?<!\d\s)-)?\$?\s?(?:\d[\d,]*(?:\.\d+)?|(?<![\d.])\.\d+)")


def normalize_number(text: str | None) -> str | None:
    """Canonical form of a number string: no ``$``, commas, spaces or trailing ``.``; ``18.00`` -> ``18``."""
    if text is None:
        return None
    cleaned = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_last_number(text: str) -> str | None:
    """The final number of a model output (normalised), or ``None``. Text after a ``####`` marker wins."""
    if "####" in text:
        found = _NUMBER.findall(text.split("####", 1)[1])
        if found:
            return normalize_number(found[0])
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def extract_gsm8k_reference(answer: str) -> str | None:
    """The number after ``####`` in a GSM8K reference solution (normalised), or ``None``."""
    if "####" not in answer:
        return None
    return normalize_number(answer.rsplit("####", 1)[1].strip())


def gsm8k_exact_match(predictions: Sequence[str], references: Sequence[str | EvalItem]) -> MetricResult:
    """Exact match of the last number in each prediction against the ``#### n`` of its reference."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    refs = [r.answer if isinstance(r, EvalItem) else r for r in references]
    gold = [extract_gsm8k_reference(r) for r in refs]
    if any(g is None for g in gold):
        bad = next(i for i, g in enumerate(gold) if g is None)
        raise ValueError(f"Reference {bad} has no '#### <number>' final answer: {refs[bad][-80:]!r}")
    pred = [extract_last_number(p) for p in predictions]
    per_item = [float(p is not None and Decimal(p) == Decimal(g)) for p, g in zip(pred, gold)]
    return MetricResult.mean_of("gsm8k_exact_match", per_item, {"extracted": pred})
