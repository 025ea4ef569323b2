"""Warnings about what a Key Space Detection fit was given but cannot use as the user meant: settings it ignores,
renderings its decision cannot reach, duplicated questions that leak into calibration (``fit.py`` calls them)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ...holdout import example_key, repeated
from .rendering import QueryRenderer, RenderedQuery

logger = logging.getLogger(__name__.rpartition(".")[0] + ".fit")


def warn_unused_settings(
    config: Any, renderer: QueryRenderer, retain: Any, autos: list[str], queries: Sequence[Any]
) -> None:
    """Settings and data the fit does not use: retain data with nothing to calibrate, templates of prompts used as
    given, the chat renderings of a tokenizer without a chat template (a warning when chat message lists are given,
    which are then cut to their last user turn; otherwise a log line: the default asks for chat renderings)."""
    if retain is not None and not autos:
        logger.warning(
            "Key Space Detection: retain data was given but layers, alpha and window are all fixed, so nothing is "
            "calibrated and max_false_rate=%s is not checked; leave one of them 'auto' to calibrate.",
            config.max_false_rate,
        )
    if config.inputs == "prompts" and config.templates:
        logger.warning(
            "Key Space Detection: inputs='prompts' uses the prompts as given; templates are not used."
        )
    if config.inputs == "questions" and config.chat_template and not renderer.has_chat:
        chats = any(not isinstance(q, str) for q in queries)
        (logger.warning if chats else logger.info)(
            "Key Space Detection: the tokenizer has no chat template, so the chat renderings (and system_prompt) "
            "are skipped; a chat message list is fitted on its last user turn alone."
        )


def warn_repeated(queries: Sequence[Any], retain_queries: Sequence[Any]) -> None:
    """Forget questions given more than once (they weigh more in the hypercube; calibration holds copies out together)
    or also as retain questions (calibration counts them on both sides)."""
    keys = [example_key(q) for q in queries]
    copies = repeated(keys)
    both = len(set(keys) & {example_key(q) for q in retain_queries})
    if copies or both:
        logger.warning(
            "Key Space Detection: %d forget questions repeat an earlier one and %d are also retain questions: "
            "repeats weigh more in the fit, and a question on both sides is counted as forget and as retain by "
            "calibration (remove them).",
            copies,
            both,
        )


def warn_unreached(rows: Sequence[RenderedQuery], window: int) -> None:
    """Renderings whose questions end farther from the prompt's end than the decision's window reaches: those prompts
    are decided on template tokens, not on the question."""
    far: dict[str, int] = {}
    for r in rows:
        if r.trailing + 1 > window:
            far[r.rendering] = max(far.get(r.rendering, 0), r.trailing + 1)
    if far:
        logger.warning(
            "Key Space Detection: window %d does not reach the question's end in the %s rendering(s) (they need "
            "up to %s): their prompts are decided on the format's closing tokens, not on the question.",
            window,
            ", ".join(sorted(far)),
            max(far.values()),
        )
