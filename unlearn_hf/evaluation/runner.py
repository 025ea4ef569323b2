"""Scoring a model on several skills at once (used by ``unlearn-hf evaluate`` and the demo)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .abstention import abstention_rate
from .multiple_choice import mmlu_accuracy
from .prompts import render_item
from .results import MetricResult
from .skills import Skill
from .token_accuracy import answer_token_accuracy

logger = logging.getLogger(__name__)


def evaluate_skill(
    model: Any,
    tokenizer: Any,
    skill: Skill,
    n_items: int,
    *,
    batch_size: int = 8,
    max_length: int = 512,
    show_progress: bool = False,
    prompt_format: str = "qa",
) -> MetricResult:
    """Score ``model`` on ``n_items`` held-out items of ``skill``: MMLU by 5-shot multiple-choice log-likelihood,
    every other skill by teacher-forced answer-token accuracy (abstained items score 0), with the prompts in
    ``prompt_format`` (:data:`~unlearn_hf.evaluation.prompts.PROMPT_FORMATS`; MMLU's 5-shot prompt is always
    the QA template)."""
    items = skill.eval_items(n_items)
    if skill.name == "mmlu":
        return mmlu_accuracy(model, tokenizer, items, batch_size=batch_size, show_progress=show_progress)
    items = [render_item(i, tokenizer, prompt_format) for i in items]
    return answer_token_accuracy(
        model, tokenizer, items, batch_size=batch_size, max_length=max_length, show_progress=show_progress
    )


def evaluate_skills(
    model: Any, tokenizer: Any, skills: list[Skill], n_items: int | dict[str, int], **kwargs: Any
) -> dict[str, MetricResult]:
    """:func:`evaluate_skill` for each skill; ``n_items`` may differ per skill name."""
    out = {}
    for skill in skills:
        n = n_items[skill.name] if isinstance(n_items, dict) else n_items
        out[skill.name] = evaluate_skill(model, tokenizer, skill, n, **kwargs)
        logger.info("%s: %.4f", skill.name, out[skill.name].score)
    return out


def abstention_rates(
    model: Any,
    tokenizer: Any,
    skills: list[Skill],
    n_items: int | Mapping[str, int],
    *,
    batch_size: int = 8,
    prompt_format: str = "qa",
) -> dict[str, float]:
    """Share of each skill's held-out prompts (in ``prompt_format``) the model abstains on (0 without abstaining
    methods): its first ``n_items`` (per skill name when a mapping: the items it is scored on)."""
    if not getattr(model, "has_abstention", False):
        return {s.name: 0.0 for s in skills}
    counts = n_items if isinstance(n_items, Mapping) else {s.name: n_items for s in skills}
    return {
        s.name: abstention_rate(
            model,
            tokenizer,
            [render_item(i, tokenizer, prompt_format).prompt for i in s.eval_items(counts[s.name])],
            batch_size=batch_size,
        )
        for s in skills
    }
