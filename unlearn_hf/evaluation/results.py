"""The outcome of a metric (:class:`MetricResult`) and the relative drop between two scores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MetricResult:
    """The outcome of one metric on one list of items.

    Args:
        name: metric name (``"answer_token_accuracy"``, ``"mmlu_accuracy"``, ``"gsm8k_exact_match"``, ...).
        score: the headline value (micro average for token accuracy).
        n_items: number of items scored.
        per_item: one score per item, in input order (``nan`` for an item with nothing to score).
        abstained: per item, whether the model abstained (all ``False`` for models without abstention).
        abstention_rate: fraction of abstained items.
        details: metric-specific extras (token counts, macro average, predictions, ...).
    """

    name: str
    score: float
    n_items: int
    per_item: list[float] = field(default_factory=list, repr=False)
    abstained: list[bool] = field(default_factory=list, repr=False)
    abstention_rate: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def mean_of(cls, name: str, per_item: list[float], details: dict[str, Any]) -> MetricResult:
        """A metric whose score is the mean of its per-item scores, with no abstention."""
        return cls(
            name=name,
            score=sum(per_item) / len(per_item) if per_item else float("nan"),
            n_items=len(per_item),
            per_item=per_item,
            abstained=[False] * len(per_item),
            details=details,
        )

    def to_dict(self, include_per_item: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict (``nan`` becomes ``None``)."""
        out: dict[str, Any] = {
            "name": self.name,
            "score": _json_float(self.score),
            "n_items": self.n_items,
            "abstention_rate": _json_float(self.abstention_rate),
            "details": {k: _json_float(v) if isinstance(v, float) else v for k, v in self.details.items()},
        }
        if include_per_item:
            out["per_item"] = [_json_float(v) for v in self.per_item]
            out["abstained"] = list(self.abstained)
        return out


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) or math.isinf(value) else float(value)


def relative_drop(before: float, after: float) -> float:
    """Relative drop ``(before - after) / before`` (``docs/METHOD.md`` §7): 1.0 = skill gone, 0.0 = unchanged.

    When ``before == 0`` there is nothing to drop: the result is ``0.0`` if ``after == 0`` too and ``nan``
    otherwise (undefined). Negative values mean the score went up.
    """
    if before == 0:
        return 0.0 if after == 0 else float("nan")
    return (before - after) / before
