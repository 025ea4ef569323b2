"""Teacher-forced answer-token accuracy (``docs/METHOD.md`` §7), the score of every skill except MMLU."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .abstention import detect_ids, scoring_context
from .batching import (
    batches,
    encode_pairs,
    encode_prompts,
    forward_at,
    pad_token_id,
    position_window,
    resolve_padding_side,
)
from .items import EvalItem
from .results import MetricResult

logger = logging.getLogger(__name__)


def _as_items(items: Sequence[EvalItem | tuple[str, str]]) -> list[EvalItem]:
    out = []
    for it in items:
        if isinstance(it, EvalItem):
            out.append(it)
        elif isinstance(it, tuple) and len(it) == 2:
            out.append(EvalItem(it[0], it[1], answer_sep=""))
        else:
            raise TypeError(f"Expected EvalItem or (prompt, answer) tuples, got {type(it).__name__}.")
    return out


def answer_token_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[EvalItem | tuple[str, str]],
    batch_size: int = 8,
    max_length: int = 512,
    show_progress: bool = False,
    padding_side: str | None = None,
) -> MetricResult:
    """Teacher-forced answer-token accuracy (``docs/METHOD.md`` §7).

    Feeds ``prompt + completion`` and counts the answer tokens whose top-1 prediction (the logits one position
    earlier) is the token itself. Abstained items count all their answer tokens as wrong.

    Args:
        model: a causal LM (or an unlearned model with abstention).
        tokenizer: its tokenizer.
        items: :class:`EvalItem` s or ``(prompt, answer)`` tuples (answer appended as is).
        batch_size: rows per forward pass (the result does not depend on it, except through a method that draws at
            random per batch row: Neuron Adjust fitted without ``deterministic=True``).
        max_length: longer texts are truncated on the left (the prompt's start goes first).
        show_progress: show tqdm bars.
        padding_side: ``"left"``/``"right"``; default the tokenizer's (the result does not depend on it, with the
            same exception).

    Returns:
        :class:`MetricResult` with ``score`` = correct / all answer tokens (micro), per-item accuracies, the
        abstention rate, and ``details`` ``n_tokens``, ``n_correct``, ``macro``, ``n_truncated_tokens``.
    """
    items = _as_items(items)
    pad_id, side = pad_token_id(tokenizer), resolve_padding_side(tokenizer, padding_side)
    if not items:
        return MetricResult("answer_token_accuracy", float("nan"), 0, details={"n_tokens": 0, "n_correct": 0})
    max_length = position_window(model, max_length)
    encoded = encode_pairs(tokenizer, [it.prompt for it in items], [it.text for it in items], max_length)
    n_cut = sum(1 for *_, cut in encoded if cut)
    if n_cut:
        logger.warning(
            "%d of %d items are longer than max_length=%d tokens: their prompts lose their start (the scores read "
            "the answers after what is left).",
            n_cut,
            len(items),
            max_length,
        )
    n_tokens = [len(ids) - start for ids, start, *_ in encoded]
    abstained = detect_ids(
        model,
        encode_prompts(tokenizer, [it.prompt for it in items], max_length),
        batch_size,
        pad_id,
        side,
        show_progress,
    )
    correct = [0] * len(items)
    todo = [i for i in range(len(items)) if not abstained[i] and n_tokens[i] > 0]
    order = sorted(todo, key=lambda i: -len(encoded[i][0]))

    def count(ids: Sequence[int]) -> Callable[[int, torch.Tensor], int]:
        return lambda r, logits: int((logits.argmax(-1).cpu() == torch.tensor(ids[r])).sum())

    with torch.no_grad(), scoring_context(model):
        for chunk in tqdm(
            batches(order, batch_size), desc="answer-token accuracy", disable=not show_progress
        ):
            seqs = [encoded[i][0] for i in chunk]
            positions = [range(encoded[i][1] - 1, len(encoded[i][0]) - 1) for i in chunk]
            targets = [encoded[i][0][encoded[i][1] :] for i in chunk]
            for i, c in zip(chunk, forward_at(model, seqs, positions, count(targets), pad_id, side)):
                correct[i] = c
    per_item = [correct[i] / n_tokens[i] if n_tokens[i] else float("nan") for i in range(len(items))]
    total = sum(n_tokens)
    scored = [v for v in per_item if not math.isnan(v)]
    return MetricResult(
        name="answer_token_accuracy",
        score=sum(correct) / total if total else float("nan"),
        n_items=len(items),
        per_item=per_item,
        abstained=abstained,
        abstention_rate=sum(abstained) / len(items),
        details={
            "n_tokens": total,
            "n_correct": sum(correct),
            "macro": sum(scored) / len(scored) if scored else float("nan"),
            "n_truncated_tokens": sum(lost for _, _, lost, _ in encoded),
            "n_truncated_items": n_cut,
        },
    )
