"""MMLU multiple-choice scoring: the few-shot prompt and the log-likelihood accuracy of the answer letters."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..tokenizing import BosRule, encode_texts, special_tokens
from .abstention import detect_ids, scoring_context
from .batching import (
    batches,
    encode_prompts,
    forward_at,
    pad_token_id,
    position_window,
    resolve_padding_side,
)
from .items import EvalItem
from .results import MetricResult

logger = logging.getLogger(__name__)

MMLU_LETTERS = ("A", "B", "C", "D")


def _mmlu_question(item: EvalItem) -> str:
    """``"Question: q\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"`` built from an MMLU item."""
    if item.choices is None or len(item.choices) != len(MMLU_LETTERS):
        raise ValueError(f"MMLU item {item.id!r} needs 4 choices, got {item.choices!r}.")
    body = item.prompt.removesuffix("Answer:").rstrip("\n")
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, item.choices))
    return f"{body}\n{options}\nAnswer:"


def mmlu_prompt(item: EvalItem, shots: int = 5) -> str:
    """The few-shot multiple-choice prompt for an MMLU item (its first ``shots`` dev examples, then it)."""
    subject = (item.subject or "").replace("_", " ")
    header = (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    )
    demos = "".join(
        f"{_mmlu_question(s)} {MMLU_LETTERS[s.label if s.label is not None else 0]}\n\n"
        for s in item.shots[:shots]
    )
    return header + demos + _mmlu_question(item)


def mmlu_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[EvalItem],
    shots: int = 5,
    batch_size: int = 8,
    max_length: int = 2048,
    show_progress: bool = False,
    padding_side: str | None = None,
) -> MetricResult:
    """MMLU multiple-choice accuracy: the answer letter (`` A``..`` D``) with the highest log-likelihood after a
    ``shots``-shot prompt from the item's subject dev examples (:func:`mmlu_prompt`).

    Prompts longer than ``max_length`` tokens drop shots first, then lose their start. Abstention is decided on
    the item's plain ``Question: ...\\nAnswer:`` prompt; abstained items score 0.

    Returns:
        :class:`MetricResult` with per-item 0/1 scores; ``details["predictions"]`` holds the chosen indices
        (-1 for abstained items), ``details["mean_shots"]`` the shots actually used and
        ``details["n_truncated_items"]`` the items that lost their start even so.
    """
    items = list(items)
    pad_id, side = pad_token_id(tokenizer), resolve_padding_side(tokenizer, padding_side)
    if not items:
        return MetricResult("mmlu_accuracy", float("nan"), 0)
    max_length = position_window(model, max_length)
    for it in items:
        if it.label is None or it.choices is None:
            raise ValueError(f"Item {it.id!r} has no choices/label; mmlu_accuracy needs MMLU items.")
    if shots > 0 and any(len(it.shots) < shots for it in items):
        logger.warning("Some MMLU items have fewer than %d dev shots; using what they have.", shots)
    abstained = detect_ids(
        model,
        encode_prompts(tokenizer, [it.prompt for it in items], max_length),
        batch_size,
        pad_id,
        side,
        show_progress,
    )
    bos, n_suffix = BosRule.of(tokenizer), len(special_tokens(tokenizer).suffix)

    def encode(text: str) -> list[int]:
        return encode_texts(tokenizer, [text], bos, n_suffix)[0]

    letter_ids = [tokenizer(" " + x, add_special_tokens=False)["input_ids"] for x in MMLU_LETTERS]
    single = all(len(t) == 1 for t in letter_ids) and len({t[0] for t in letter_ids}) == len(letter_ids)
    contexts: dict[int, list[int]] = {}
    used_shots: list[int] = []
    room = max_length - max(len(t) for t in letter_ids)  # the context's room before the longest answer letter
    n_cut = 0  # items longer than that even without shots: they lose their start
    for i, it in enumerate(items):
        if abstained[i]:
            continue
        k = min(shots, len(it.shots))
        ids = encode(mmlu_prompt(it, k))
        while len(ids) > room and k > 0:  # shots go first, then the prompt's start
            k -= 1
            ids = encode(mmlu_prompt(it, k))
        n_cut += len(ids) > room
        contexts[i] = ids[-room:]
        used_shots.append(k)
    if n_cut:
        logger.warning(
            "%d of %d MMLU items are longer than max_length=%d tokens without shots: they lose their start.",
            n_cut,
            len(items),
            max_length,
        )

    rows: list[
        tuple[int, int, list[int], list[int]]
    ] = []  # (item, letter or -1 for all four, sequence, cont)
    for i, ctx in contexts.items():
        if single:
            rows.append((i, -1, ctx, []))
        else:
            rows.extend((i, k, ctx + t, t) for k, t in enumerate(letter_ids))
    values = {i: [float("-inf")] * len(MMLU_LETTERS) for i in contexts}
    order = sorted(range(len(rows)), key=lambda j: (-len(rows[j][2]), j))

    def reduce(batch: list[int]) -> Callable[[int, torch.Tensor], Any]:
        def fn(r: int, logits: torch.Tensor) -> Any:
            logp = torch.log_softmax(logits, -1)
            _, k, _, cont = rows[batch[r]]
            if k < 0:
                return [float(logp[0, t[0]]) for t in letter_ids]
            return float(sum(logp[n, tok] for n, tok in enumerate(cont)))

        return fn

    with torch.no_grad(), scoring_context(model):
        for chunk in tqdm(batches(order, batch_size), desc="mmlu", disable=not show_progress):
            positions = [_mmlu_positions(rows[j][2], rows[j][3]) for j in chunk]
            outs = forward_at(model, [rows[j][2] for j in chunk], positions, reduce(chunk), pad_id, side)
            for j, out in zip(chunk, outs):
                i, k = rows[j][0], rows[j][1]
                if k < 0:
                    values[i] = out
                else:
                    values[i][k] = out
    predictions = [-1] * len(items)
    for i, v in values.items():
        predictions[i] = max(range(len(v)), key=lambda k: v[k])
    per_item = [float(p == it.label) for p, it in zip(predictions, items)]
    return MetricResult(
        name="mmlu_accuracy",
        score=sum(per_item) / len(items),
        n_items=len(items),
        per_item=per_item,
        abstained=abstained,
        abstention_rate=sum(abstained) / len(items),
        details={
            "predictions": predictions,
            "shots": shots,
            "mean_shots": sum(used_shots) / len(used_shots) if used_shots else float("nan"),
            "n_truncated_items": n_cut,
        },
    )


def _mmlu_positions(seq: Sequence[int], cont: Sequence[int]) -> range:
    """Positions whose logits predict ``cont`` (the last one only when scoring the next token)."""
    if not cont:
        return range(len(seq) - 1, len(seq))
    return range(len(seq) - len(cont) - 1, len(seq) - 1)
