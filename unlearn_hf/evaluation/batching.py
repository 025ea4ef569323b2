"""Padding-aware batched forwards for the metrics, and the tokenization they rely on.

All forwards are padding-aware (either padding side, position ids from the attention mask), so the scores do
not depend on the batch size. Longer texts are truncated on the left; special tokens a tokenizer appends (an
EOS) are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..model_inputs import accepts, input_device, learned_position_limit, position_ids_from_mask
from ..tokenizing import BosRule, encode_texts, shared_prefix_length, special_tokens

logger = logging.getLogger(__name__)


def position_window(model: Any, max_length: int, reserve: int = 0) -> int:
    """``max_length``, or less for a model with learned position embeddings (GPT-2's ``wpe``): a longer input would
    index past its table (an ``IndexError`` in the middle of an evaluation). ``reserve``: positions kept free for
    the tokens generated after the prompt."""
    limit = learned_position_limit(model) if isinstance(model, torch.nn.Module) else None  # or a stand-in
    if limit is None or max_length + reserve <= limit:
        return max_length
    if limit - reserve < 1:
        raise ValueError(f"The model has {limit} positions: no room for a prompt and {reserve} new tokens.")
    logger.info(
        "max_length %d is cut to %d: the model has %d learned positions.", max_length, limit - reserve, limit
    )
    return limit - reserve


def pad_token_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def resolve_padding_side(tokenizer: Any, padding_side: str | None) -> str:
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}.")
    return side


def pad(
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


def forward_at(
    model: Any,
    seqs: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    reduce: Callable[[int, torch.Tensor], Any],
    pad_id: int,
    side: str,
) -> list[Any]:
    """One padded forward; for row ``r`` returns ``reduce(r, logits[r, positions[r]])`` (float32 logits)."""
    device = input_device(model)
    ids, mask, offsets = pad(seqs, pad_id, side)
    width = ids.shape[1]
    kwargs: dict[str, Any] = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "use_cache": False,
    }
    if side == "left" and accepts(model, "position_ids", through_kwargs=True):
        kwargs["position_ids"] = position_ids_from_mask(mask).to(device)
    first = min((offsets[r] + min(p) for r, p in enumerate(positions) if len(p)), default=width - 1)
    if accepts(model, "logits_to_keep", through_kwargs=True):
        kwargs["logits_to_keep"] = width - first
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    base = width - logits.shape[1]
    results = []
    for r, pos in enumerate(positions):
        idx = torch.tensor([offsets[r] + p - base for p in pos], dtype=torch.long, device=logits.device)
        results.append(reduce(r, logits[r].index_select(0, idx).float()))
    return results


def encode_pairs(
    tokenizer: Any, prompts: Sequence[str], texts: Sequence[str], max_length: int
) -> list[tuple[list[int], int, int, int]]:
    """Token ids of ``texts`` (left-truncated to ``max_length``), the index of the first answer token, how many
    answer tokens were cut off by truncation, and how many tokens were cut. The answer starts where the text's ids
    stop matching the prompt's; special tokens the tokenizer appends (an EOS) are dropped."""
    rule, n_suffix = BosRule.of(tokenizer), len(special_tokens(tokenizer).suffix)
    full, pre = (encode_texts(tokenizer, t, rule, n_suffix) for t in (texts, prompts))
    out = []
    for f, p in zip(full, pre):
        start = shared_prefix_length(f, p)
        cut = max(0, len(f) - max_length)
        lost = max(0, cut + 1 - start)  # answer tokens without a preceding position in the window
        out.append((f[cut:], max(start - cut, 1), lost, cut))
    return out


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    ids = encode_texts(tokenizer, prompts, drop_suffix=len(special_tokens(tokenizer).suffix))
    return [s[-max_length:] for s in ids]


def batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
