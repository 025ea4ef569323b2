"""Greedy generation for the generative metrics (GSM8K exact match, pass@1 of code skills)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..model_inputs import input_device
from .batching import batches, encode_prompts, pad, pad_token_id, position_window
from .items import ANSWER_STOP, EvalItem


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | EvalItem],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    stop: Sequence[str] | None = None,
    max_length: int = 2048,
    show_progress: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """Greedy completions (new text only, cut at the first stop string), left-padded batches.

    ``stop``: the strings that end every completion; ``None``: each item's own (:attr:`EvalItem.stop`: a HumanEval
    completion ends where the function body does, the others at the template's next ``"\nQuestion:"``), and
    ``"\nQuestion:"`` for plain prompts. Extra keyword arguments go to ``model.generate``.
    """
    texts = [p.prompt if isinstance(p, EvalItem) else p for p in prompts]
    stops = [
        tuple(stop) if stop is not None else p.stop if isinstance(p, EvalItem) else ANSWER_STOP
        for p in prompts
    ]
    seqs = encode_prompts(tokenizer, texts, position_window(model, max_length, reserve=max_new_tokens))
    pad_id, device = pad_token_id(tokenizer), input_device(model)
    out: list[str] = [""] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: -len(seqs[i]))
    generate_kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        for chunk in tqdm(batches(order, batch_size), desc="generate", disable=not show_progress):
            ids, mask, _ = pad([seqs[i] for i in chunk], pad_id, "left")
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
                cuts = [text.find(s) for s in stops[i] if s and s in text]
                out[i] = text[: min(cuts)] if cuts else text
    return out
