"""Abstention: which prompts a model abstains on, and scoring forwards that measure the model itself.

Models that abstain (the library's ``UnlearnedModelForCausalLM``, or anything with a truthy ``has_abstention``,
a ``detect(input_ids, attention_mask) -> bool[batch]`` method and a ``disable_abstention()`` context manager)
are scored honestly: ``detect`` runs on the tokenized prompts, abstained items score 0, and the scoring forward
of the others runs with abstention disabled so that it measures the (possibly intervened) model itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..model_inputs import input_device
from .batching import batches, encode_prompts, pad, pad_token_id, position_window, resolve_padding_side
from .items import EvalItem


def has_abstention(model: Any) -> bool:
    return bool(getattr(model, "has_abstention", False))


def detect_ids(
    model: Any, seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int, side: str, show_progress: bool
) -> list[bool]:
    """Per token sequence, whether ``model`` abstains on it (all ``False`` for models without abstention)."""
    if not has_abstention(model):
        return [False] * len(seqs)
    device = input_device(model)
    flags = [False] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    with torch.no_grad():
        for chunk in tqdm(batches(order, batch_size), desc="abstention", disable=not show_progress):
            ids, mask, _ = pad([seqs[i] for i in chunk], pad_id, side)
            decision = model.detect(ids.to(device), mask.to(device))
            decision = torch.as_tensor(decision).reshape(-1).bool().tolist()
            if len(decision) != len(chunk):
                raise RuntimeError(
                    f"model.detect returned {len(decision)} decisions for a batch of {len(chunk)}."
                )
            for i, d in zip(chunk, decision):
                flags[i] = d
    return flags


def scoring_context(model: Any):
    """A context in which ``model``'s forwards run with abstention disabled (a no-op without abstention)."""
    return model.disable_abstention() if has_abstention(model) else contextlib.nullcontext()


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
    if not texts or not has_abstention(model):
        return [False] * len(texts)
    seqs = encode_prompts(tokenizer, texts, position_window(model, max_length))
    return detect_ids(
        model,
        seqs,
        batch_size,
        pad_token_id(tokenizer),
        resolve_padding_side(tokenizer, padding_side),
        show_progress,
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
