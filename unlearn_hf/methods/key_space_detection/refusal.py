"""What an abstaining row emits: the refusal's tokens, then end-of-sequence, forced onto its logits."""

from __future__ import annotations

import inspect

import torch
from transformers import LogitsProcessor

from ...context import RequestState


class Refusal:
    """Forces the refusal onto the logits of abstaining rows.

    An abstaining row emits the refusal's tokens in order, then end-of-sequence (repeated). Its logits are
    replaced by a one-hot distribution (0 for the forced token, -inf elsewhere). Position ``p`` of a forward whose
    last position predicts generation step ``s`` is forced to the token of step ``s - (P - 1 - p)`` counted from
    the step at which the row began abstaining (earlier steps: the refusal's first token).

    Args:
        refusal_ids: int64 ``[n]``, the refusal's tokens (empty for ``action="eos"``).
        eos_token_id: the model's end-of-sequence token (a request may bring its own).
    """

    def __init__(self, refusal_ids: torch.Tensor, eos_token_id: int) -> None:
        self.refusal_ids = refusal_ids.to("cpu", torch.int64)
        self.eos_token_id = int(eos_token_id)
        self._tokens: dict[int, torch.Tensor] = {}

    def tokens(self, eos: int | None = None) -> torch.Tensor:
        """The tokens an abstaining row emits: the refusal, then ``eos`` (int64, CPU)."""
        eos = self.eos_token_id if eos is None else int(eos)
        tokens = self._tokens.get(eos)
        if tokens is None:
            tokens = self._tokens[eos] = torch.cat([self.refusal_ids, torch.tensor([eos])])
        return tokens

    def force(
        self,
        scores: torch.Tensor,
        abstained: torch.Tensor,
        start: torch.Tensor,
        step: int,
        request: RequestState | None = None,
    ) -> None:
        """Overwrite, in place, the abstaining rows of ``scores`` (``[rows, vocab]``, or ``[rows, positions, vocab]``
        whose last position predicts generation step ``step``) with the one-hot forced token.

        Args:
            abstained: bool ``[rows]``; start: int64 ``[rows]``, the step at which each row began abstaining.
        """
        eos = request.eos_token_id if request is not None else None
        forced = self.tokens(eos)
        rows = abstained.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        view = scores.unsqueeze(1) if scores.ndim == 2 else scores
        n_pos = view.shape[1]
        steps = torch.arange(step - n_pos + 1, step + 1)
        index = (steps.unsqueeze(0) - start[rows].unsqueeze(1)).clamp_(0, forced.numel() - 1)
        device = scores.device
        tokens = forced[index].to(device)
        rows = rows.to(device)
        view[rows] = float("-inf")
        view[rows.unsqueeze(1), torch.arange(n_pos, device=device).unsqueeze(0), tokens] = 0.0


class AbstentionLogitsProcessor(LogitsProcessor):
    """Runs last in ``generate``: re-imposes the forced token of every abstaining row after all other processors
    (``min_new_tokens``, repetition penalties, bad words, temperature, top-k/p...), which could otherwise move or
    erase it.

    Args:
        attachment: the abstaining attachment whose decision this request follows (see ``decision.py``).
        request: the ``generate`` call's request.
    """

    def __init__(self, attachment, request: RequestState) -> None:
        self.attachment = attachment
        self.request = request

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        st = self.attachment.request_data(self.request)
        if st is None or not st.any or self.request.prefill_len is None:
            return scores
        step = input_ids.shape[1] + self.request.ids_missing - self.request.prefill_len
        self.attachment.refusal.force(scores, st.abstained, st.start, step, self.request)
        return scores


# ``LogitsProcessorList`` inspects every processor's signature at every step: give it a ready one.
AbstentionLogitsProcessor.__call__.__signature__ = inspect.signature(AbstentionLogitsProcessor.__call__)
