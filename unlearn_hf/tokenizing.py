"""How text becomes token ids for the probes and the evaluation: the user's tokenizer, called but never copied or
changed, with the pad id and the sides a probe uses, and one rule for text that carries its own BOS token.

A text rendered by a chat template (``apply_chat_template(..., tokenize=False)``) often starts with the BOS token
(Llama 3's ``<|begin_of_text|>``, Gemma's ``<bos>``); a tokenizer that adds BOS itself then doubles it, which the
model never sees at generation time (``apply_chat_template(tokenize=True)`` and ``pipeline`` add it once).
:class:`BosRule` finds that case, and the probe, Key Space Detection's renderings and the evaluation drop the
tokenizer's copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch


class SpecialTokens(NamedTuple):
    """The special token ids a tokenizer adds before (``prefix``) and after (``suffix``) every text."""

    prefix: list[int]
    suffix: list[int]


def special_tokens(tokenizer: Any) -> SpecialTokens:
    """What :class:`SpecialTokens` ``tokenizer`` adds, read from one text tokenized with and without them."""
    plain = list(tokenizer("hello world", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("hello world")["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return SpecialTokens(full[:k], full[k + len(plain) :])
    return SpecialTokens([], [])


@dataclass(frozen=True)
class BosRule:
    """The BOS token a tokenizer puts in front of every text itself (``token``/``id`` ``None``: it adds none, or
    has no BOS token), and which leading ids of a text to drop because of it."""

    token: str | None = None
    id: int | None = None

    @classmethod
    def of(cls, tokenizer: Any) -> BosRule:
        """The rule of ``tokenizer``: it adds BOS when the special tokens it puts before a text start with it."""
        token, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
        if not token or bos_id is None:
            return cls()
        prefix = special_tokens(tokenizer).prefix
        return cls(token, bos_id) if prefix[:1] == [bos_id] else cls()

    def drop(self, text: str, ids: Sequence[int]) -> int:
        """How many leading ``ids`` of ``text`` (tokenized with special tokens) to drop: 1 where the text starts
        with the BOS token and the tokenizer added its own in front of it, else 0."""
        if self.token is None or len(ids) < 2 or not text.startswith(self.token):
            return 0
        return int(ids[0] == ids[1] == self.id)


def encode_texts(
    tokenizer: Any, texts: Sequence[str], rule: BosRule | None = None, drop_suffix: int = 0
) -> list[list[int]]:
    """Token ids of ``texts`` with the tokenizer's special tokens, BOS once (``rule``: the tokenizer's
    :class:`BosRule`, found when not given), less the last ``drop_suffix`` ids (the suffix of
    :func:`special_tokens`, e.g. an EOS, for a text the model is to continue)."""
    rule = BosRule.of(tokenizer) if rule is None else rule
    out = []
    for text, ids in zip(texts, tokenizer(list(texts))["input_ids"]):
        ids = list(ids)
        ids = ids[rule.drop(text, ids) :]
        out.append(ids[:-drop_suffix] if drop_suffix else ids)
    return out


def encode_text(tokenizer: Any, text: str, rule: BosRule, special: bool = True) -> list[int]:
    """Token ids of one ``text``; with ``special``, the tokenizer's special tokens, BOS once (``rule``)."""
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    ids = list(ids.flatten().tolist() if hasattr(ids, "flatten") else ids)
    return ids[rule.drop(text, ids) :] if special else ids


def prompt_tensors(tokenizer: Any, text: str) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[1, n]`` of one prompt for ``generate``, BOS once
    (:func:`encode_texts`)."""
    (ids,) = encode_texts(tokenizer, [text])
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
    }


@dataclass(frozen=True)
class TextTokenizer:
    """The tokenizer of a probe's text: ``encode`` with the tokenizer's special tokens (BOS added once), the pad id
    (the pad token's, else the EOS token's) and the padding and truncation sides.

    Attributes:
        tokenizer: the user's tokenizer (only called).
        pad_token_id: the id that pads rows.
        padding_side / truncation_side: ``"left"`` or ``"right"``; query mode truncates on the left.
        bos: the tokenizer's :class:`BosRule`.
    """

    tokenizer: Any
    pad_token_id: int
    padding_side: str
    truncation_side: str
    bos: BosRule = BosRule()

    @classmethod
    def of(cls, tokenizer: Any, mode: str) -> TextTokenizer:
        """The view of ``tokenizer`` for token mode ``mode`` (``"last"``: truncated on the left).

        Raises:
            ValueError: no tokenizer, or one with neither a pad token nor an EOS token.
        """
        if tokenizer is None:
            raise ValueError("A tokenizer is needed to tokenize text data (pass tokenizer=...).")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token to pad with.")
        side = "left" if mode == "last" else getattr(tokenizer, "truncation_side", "right")
        return cls(tokenizer, pad, getattr(tokenizer, "padding_side", "right"), side, BosRule.of(tokenizer))

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; with ``special``, the tokenizer's special tokens, BOS only once."""
        return encode_text(self.tokenizer, text, self.bos, special)


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many token ids ``a`` and ``b`` share from the start (where a prompt tokenized alone stops matching the
    prompt + answer text tokenized whole: the first answer token)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
