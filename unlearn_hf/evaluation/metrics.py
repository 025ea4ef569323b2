"""Skill scores: teacher-forced answer-token accuracy, MMLU log-likelihood accuracy, abstention, generation.

Models that abstain (the library's ``UnlearnedModelForCausalLM``, or anything with a truthy ``has_abstention``,
a ``detect(input_ids, attention_mask) -> bool[batch]`` method and a ``disable_abstention()`` context manager)
are scored honestly: ``detect`` runs on the tokenized prompts, abstained items score 0, and the scoring forward
of the others runs with abstention disabled so that it measures the (possibly intervened) model itself.

All forwards are padding-aware (either padding side, position ids from the attention mask), so the scores do
not depend on the batch size.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import torch
from tqdm.auto import tqdm

from .skills import EvalItem

logger = logging.getLogger(__name__)

MMLU_LETTERS = ("A", "B", "C", "D")


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
    """Relative drop ``(before - after) / before`` (METHOD.md §7): 1.0 = skill gone, 0.0 = unchanged.

    When ``before == 0`` there is nothing to drop: the result is ``0.0`` if ``after == 0`` too and ``nan``
    otherwise (undefined). Negative values mean the score went up.
    """
    if before == 0:
        return 0.0 if after == 0 else float("nan")
    return (before - after) / before


# model plumbing ------------------------------------------------------------------------------------------------
def _has_abstention(model: Any) -> bool:
    return bool(getattr(model, "has_abstention", False))


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _accepts(model: Any, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _padding_side(tokenizer: Any, padding_side: str | None) -> str:
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}.")
    return side


def _pad(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Padded ``input_ids``, ``attention_mask`` and each row's offset (where its first real token sits)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = []
    for r, s in enumerate(seqs):
        o = width - len(s) if side == "left" else 0
        ids[r, o : o + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[r, o : o + len(s)] = 1
        offsets.append(o)
    return ids, mask, offsets


def _forward_at(
    model: Any,
    seqs: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    reduce: Callable[[int, torch.Tensor], Any],
    pad_id: int,
    side: str,
) -> list[Any]:
    """One padded forward; for row ``r`` returns ``reduce(r, logits[r, positions[r]])`` (float32 logits)."""
    device = _model_device(model)
    ids, mask, offsets = _pad(seqs, pad_id, side)
    width = ids.shape[1]
    kwargs: dict[str, Any] = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "use_cache": False,
    }
    if side == "left" and _accepts(model, "position_ids"):
        kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0).to(device)
    first = min((offsets[r] + min(p) for r, p in enumerate(positions) if len(p)), default=width - 1)
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = width - first
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    base = width - logits.shape[1]
    results = []
    for r, pos in enumerate(positions):
        idx = torch.tensor([offsets[r] + p - base for p in pos], dtype=torch.long, device=logits.device)
        results.append(reduce(r, logits[r].index_select(0, idx).float()))
    return results


def _special_layout(tokenizer: Any) -> tuple[int, int]:
    """How many special tokens the tokenizer adds before and after a text."""
    plain = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello world")["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return k, len(full) - k - len(plain)
    return 0, 0


def _encode_pairs(
    tokenizer: Any, prompts: Sequence[str], texts: Sequence[str], max_length: int
) -> list[tuple[list[int], int, int]]:
    """Token ids of ``texts`` (left-truncated to ``max_length``), the index of the first answer token, and how
    many answer tokens were cut off by truncation. The answer starts where the text's ids stop matching the
    prompt's; special tokens the tokenizer appends (an EOS) are dropped."""
    _, n_suffix = _special_layout(tokenizer)
    full = tokenizer(list(texts))["input_ids"]
    pre = tokenizer(list(prompts))["input_ids"]
    out = []
    for f, p in zip(full, pre):
        if n_suffix:
            f, p = f[:-n_suffix], p[:-n_suffix]
        start = 0
        while start < min(len(f), len(p)) and f[start] == p[start]:
            start += 1
        cut = max(0, len(f) - max_length)
        lost = max(0, cut + 1 - start)  # answer tokens without a preceding position in the window
        out.append((f[cut:], max(start - cut, 1), lost))
    return out


def _encode_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    _, n_suffix = _special_layout(tokenizer)
    ids = tokenizer(list(prompts))["input_ids"]
    return [(s[:-n_suffix] if n_suffix else s)[-max_length:] for s in ids]


def _batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def _detect_ids(
    model: Any, seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int, side: str, show_progress: bool
) -> list[bool]:
    if not _has_abstention(model):
        return [False] * len(seqs)
    device = _model_device(model)
    flags = [False] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with torch.no_grad():
        for chunk in tqdm(_batches(order, batch_size), desc="abstention", disable=not show_progress):
            ids, mask, _ = _pad([seqs[i] for i in chunk], pad_id, side)
            decision = model.detect(ids.to(device), mask.to(device))
            decision = torch.as_tensor(decision).reshape(-1).bool().tolist()
            if len(decision) != len(chunk):
                raise RuntimeError(
                    f"model.detect returned {len(decision)} decisions for a batch of {len(chunk)}."
                )
            for i, d in zip(chunk, decision):
                flags[i] = d
    return flags


def _scoring_context(model: Any):
    return model.disable_abstention() if _has_abstention(model) else contextlib.nullcontext()


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


# public metrics ----------------------------------------------------------------------------------------------
def detect_abstention(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | EvalItem],
    batch_size: int = 8,
    max_length: int = 512,
    padding_side: str | None = None,
    show_progress: bool = False,
) -> list[bool]:
    """Per prompt, whether ``model`` abstains (``model.detect``); all ``False`` for models without abstention."""
    texts = [p.prompt if isinstance(p, EvalItem) else p for p in prompts]
    if not texts or not _has_abstention(model):
        return [False] * len(texts)
    seqs = _encode_prompts(tokenizer, texts, max_length)
    return _detect_ids(
        model, seqs, batch_size, _pad_id(tokenizer), _padding_side(tokenizer, padding_side), show_progress
    )


def abstention_rate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | EvalItem],
    batch_size: int = 8,
    max_length: int = 512,
    show_progress: bool = False,
) -> float:
    """Fraction of ``prompts`` on which ``model`` abstains (0.0 for a model without abstention)."""
    flags = detect_abstention(model, tokenizer, prompts, batch_size, max_length, show_progress=show_progress)
    return sum(flags) / len(flags) if flags else 0.0


def answer_token_accuracy(
    model: Any,
    tokenizer: Any,
    items: Sequence[EvalItem | tuple[str, str]],
    batch_size: int = 8,
    max_length: int = 512,
    show_progress: bool = False,
    padding_side: str | None = None,
) -> MetricResult:
    """Teacher-forced answer-token accuracy (METHOD.md §7).

    Feeds ``prompt + completion`` and counts the answer tokens whose top-1 prediction (the logits one position
    earlier) is the token itself. Abstained items count all their answer tokens as wrong.

    Args:
        model: a causal LM (or an unlearned model with abstention).
        tokenizer: its tokenizer.
        items: :class:`EvalItem` s or ``(prompt, answer)`` tuples (answer appended as is).
        batch_size: rows per forward pass (the result does not depend on it).
        max_length: longer texts are truncated on the left (the prompt's start goes first).
        show_progress: show tqdm bars.
        padding_side: ``"left"``/``"right"``; default the tokenizer's (the result does not depend on it).

    Returns:
        :class:`MetricResult` with ``score`` = correct / all answer tokens (micro), per-item accuracies, the
        abstention rate, and ``details`` ``n_tokens``, ``n_correct``, ``macro``, ``n_truncated_tokens``.
    """
    items = _as_items(items)
    pad_id, side = _pad_id(tokenizer), _padding_side(tokenizer, padding_side)
    if not items:
        return MetricResult("answer_token_accuracy", float("nan"), 0, details={"n_tokens": 0, "n_correct": 0})
    encoded = _encode_pairs(tokenizer, [it.prompt for it in items], [it.text for it in items], max_length)
    n_tokens = [len(ids) - start for ids, start, _ in encoded]
    abstained = _detect_ids(
        model,
        _encode_prompts(tokenizer, [it.prompt for it in items], max_length),
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

    with torch.no_grad(), _scoring_context(model):
        for chunk in tqdm(
            _batches(order, batch_size), desc="answer-token accuracy", disable=not show_progress
        ):
            seqs = [encoded[i][0] for i in chunk]
            positions = [range(encoded[i][1] - 1, len(encoded[i][0]) - 1) for i in chunk]
            targets = [encoded[i][0][encoded[i][1] :] for i in chunk]
            for i, c in zip(chunk, _forward_at(model, seqs, positions, count(targets), pad_id, side)):
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
            "n_truncated_tokens": sum(lost for _, _, lost in encoded),
        },
    )


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
        (-1 for abstained items) and ``details["mean_shots"]`` the shots actually used.
    """
    items = list(items)
    pad_id, side = _pad_id(tokenizer), _padding_side(tokenizer, padding_side)
    if not items:
        return MetricResult("mmlu_accuracy", float("nan"), 0)
    for it in items:
        if it.label is None or it.choices is None:
            raise ValueError(f"Item {it.id!r} has no choices/label; mmlu_accuracy needs MMLU items.")
    if shots > 0 and any(len(it.shots) < shots for it in items):
        logger.warning("Some MMLU items have fewer than %d dev shots; using what they have.", shots)
    abstained = _detect_ids(
        model,
        _encode_prompts(tokenizer, [it.prompt for it in items], max_length),
        batch_size,
        pad_id,
        side,
        show_progress,
    )
    _, n_suffix = _special_layout(tokenizer)

    def encode(text: str) -> list[int]:
        ids = tokenizer(text)["input_ids"]
        return ids[:-n_suffix] if n_suffix else ids

    letter_ids = [tokenizer(" " + x, add_special_tokens=False)["input_ids"] for x in MMLU_LETTERS]
    single = all(len(t) == 1 for t in letter_ids) and len({t[0] for t in letter_ids}) == len(letter_ids)
    contexts: dict[int, list[int]] = {}
    used_shots: list[int] = []
    for i, it in enumerate(items):
        if abstained[i]:
            continue
        k = min(shots, len(it.shots))
        ids = encode(mmlu_prompt(it, k))
        while len(ids) + 1 > max_length and k > 0:
            k -= 1
            ids = encode(mmlu_prompt(it, k))
        contexts[i] = ids[-(max_length - max(len(t) for t in letter_ids)) :]
        used_shots.append(k)

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

    with torch.no_grad(), _scoring_context(model):
        for chunk in tqdm(_batches(order, batch_size), desc="mmlu", disable=not show_progress):
            positions = [_mmlu_positions(rows[j][2], rows[j][3]) for j in chunk]
            outs = _forward_at(model, [rows[j][2] for j in chunk], positions, reduce(chunk), pad_id, side)
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
        },
    )


def _mmlu_positions(seq: Sequence[int], cont: Sequence[int]) -> range:
    """Positions whose logits predict ``cont`` (the last one only when scoring the next token)."""
    if not cont:
        return range(len(seq) - 1, len(seq))
    return range(len(seq) - len(cont) - 1, len(seq) - 1)


# generation ---------------------------------------------------------------------------------------------------
def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | EvalItem],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    stop: Sequence[str] = ("\nQuestion:",),
    max_length: int = 2048,
    show_progress: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy completions (new text only, cut at the first ``stop`` string), left-padded batches.

    Extra keyword arguments go to ``model.generate``.
    """
    texts = [p.prompt if isinstance(p, EvalItem) else p for p in prompts]
    seqs = _encode_prompts(tokenizer, texts, max_length)
    pad_id, device = _pad_id(tokenizer), _model_device(model)
    out: list[str] = [""] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(seqs[i]))
    generate_kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        for chunk in tqdm(_batches(order, batch_size), desc="generate", disable=not show_progress):
            ids, mask, _ = _pad([seqs[i] for i in chunk], pad_id, "left")
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                **generate_kwargs,
            )
            gen = gen.sequences if hasattr(gen, "sequences") else gen
            for i, row in zip(chunk, gen[:, ids.shape[1] :]):
                text = tokenizer.decode(row, skip_special_tokens=True)
                cuts = [text.find(s) for s in stop if s and s in text]
                out[i] = text[: min(cuts)] if cuts else text
    return out


_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")


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
    return MetricResult(
        name="gsm8k_exact_match",
        score=sum(per_item) / len(per_item) if per_item else float("nan"),
        n_items=len(per_item),
        per_item=per_item,
        abstained=[False] * len(per_item),
        details={"extracted": pred},
    )
