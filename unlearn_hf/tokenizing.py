"""How text is tokenized for a probe: the user's tokenizer, called but never copied or changed, with the pad id
and the sides a probe uses, and one rule for text that carries its own BOS token.

A text rendered by a chat template (``apply_chat_template(..., tokenize=False)``) often starts with the BOS token
(Llama 3's ``<|begin_of_text|>``, Gemma's ``<bos>``); a tokenizer that adds BOS itself then doubles it, which the
model never sees at generation time (``apply_chat_template(tokenize=True)`` and ``pipeline`` add it once).
:func:`doubled_bos` finds that case, and the callers drop the tokenizer's copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


def doubled_bos(tokenizer: Any, text: str, ids: list[int]) -> int:
    """How many leading ``ids`` of ``text`` to drop: 1 where the text starts with the tokenizer's BOS token and the
    tokenizer added its own in front of it, else 0."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None or len(ids) < 2 or not text.startswith(bos):
        return 0
    return int(ids[0] == ids[1] == bos_id)


@dataclass(frozen=True)
class TextTokenizer:
    """The tokenizer of a probe's text: ``encode`` with the tokenizer's special tokens (BOS added once), the pad id
    (the pad token's, else the EOS token's) and the padding and truncation sides.

    Attributes:
        tokenizer: the user's tokenizer (only called).
        pad_token_id: the id that pads rows.
        padding_side / truncation_side: ``"left"`` or ``"right"``; query mode truncates on the left.
    """

    tokenizer: Any
    pad_token_id: int
    padding_side: str
    truncation_side: str

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
        return cls(tokenizer, pad, getattr(tokenizer, "padding_side", "right"), side)

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; with ``special``, the tokenizer's special tokens, BOS only once
        (:func:`doubled_bos`)."""
        ids = list(self.tokenizer(text, add_special_tokens=special)["input_ids"])
        return ids[doubled_bos(self.tokenizer, text, ids) :] if special else ids
