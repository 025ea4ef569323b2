"""Per-call state of an unlearned model: which forward is running, for which request, and whether hooks apply.

Hooks on the shared FFL modules do nothing unless the *unlearned* model is being called in the current context
(thread / asyncio task), so the plain base model and other wrappers over the same modules are unaffected, and
concurrent calls never see each other's state. State that must survive across the forward calls of one
request (prefill length, per-row abstention flags) lives in a :class:`RequestState`, held by the ``generate``
call, or attached to the KV cache for hand-written decoding loops.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .model_inputs import StopForward, last_token_index, trailing_token_index


@dataclass
class RequestState:
    """State of one request (a ``generate`` call, or a sequence of cached forwards).

    Attributes:
        owner: the unlearned model serving the request.
        prefill_len: total sequence length after the forward that ended the prompt (``None`` before it).
        prompt_len: total length of the prompt when known in advance (``generate`` sets it): forwards that end
            before it are prompt chunks (chunked prefill) and do not end the prompt; a first forward that runs past
            it (assisted decoding verifies candidate tokens along with the prompt) ends the prompt at it.
        eos_token_id: the end-of-sequence token of this request (``generate``'s own, when it differs from the
            model's default).
        group_size: rows that move together (``num_beams``: beam search reorders rows within a group).
        speculative: decoding forwards may carry several tokens, some of them candidates that are then rejected
            (assisted decoding, prompt lookup).
        processors: the abstaining methods' logits processors of this ``generate`` call.
        ids_missing: prompt tokens absent from the ``input_ids`` logits processors see (``generate`` from
            ``inputs_embeds`` alone hands them only the generated tokens).
        stop_when_decided: names of the abstaining methods still to decide; when the set empties the forward may
            stop early (:meth:`UnlearnedModelForCausalLM.detect` needs nothing after the decision).
        data: per-method scratch space, keyed by method name.
    """

    owner: Any
    prefill_len: int | None = None
    prompt_len: int | None = None
    eos_token_id: int | None = None
    group_size: int = 1
    speculative: bool = False
    processors: list[Any] = field(default_factory=list)
    ids_missing: int = 0
    stop_when_decided: set[str] | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict) -> RequestState:
        """A copy of the request's state, served by the same model (the owner is not copied): a KV cache copied to
        reuse a prompt's prefill for several continuations (``copy.deepcopy(cache)``) carries its request with it,
        abstention decisions included, and does not drag a copy of the whole model along."""
        new = RequestState.__new__(type(self))
        memo[id(self)] = new
        key = id(self.owner)
        # the model's copy when the same deepcopy copies the model too (deepcopy([model, cache])), else the model
        owner = memo.get(key, self.owner)
        memo[key] = owner  # what the request's data refers to of the model follows it
        try:
            for f in fields(self):
                setattr(new, f.name, copy.deepcopy(getattr(self, f.name), memo))
        finally:
            if owner is self.owner:  # the rest of this deepcopy copies the model as it would have
                del memo[key]
        return new

    def select_rows(self, apply: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a change of the request's rows (``apply`` maps a ``[rows, ...]`` tensor to the new rows: see
        :mod:`unlearn_hf.cache_rows`) to the per-row state of every method that keeps one (a ``select_rows`` method
        of its data)."""
        for value in self.data.values():
            select = getattr(value, "select_rows", None)
            if select is not None:
                select(apply)

    def decided(self, name: str) -> None:
        """Called by an abstaining method once its decision for this request is final; raises
        :class:`StopForward` when nothing else in the forward is needed."""
        if self.stop_when_decided is not None:
            self.stop_when_decided.discard(name)
            if not self.stop_when_decided:
                raise StopForward


@dataclass
class ForwardContext:
    """What the hooks of one forward call may read.

    Attributes:
        model: the unlearned model being called.
        request: the request this forward belongs to.
        is_prefill: the forward that ends the prompt (the first forward of a request, or the last prompt chunk
            with chunked prefill): abstention is decided here.
        is_prompt_chunk: a forward over the prompt that does not end it (chunked prefill).
        input_len: number of positions in this forward's input.
        total_len: sequence length including the cached past.
        attention_mask: mask of this forward's positions ``[batch, input_len]`` (``None`` = all real).
        disabled: names of methods switched off for this call.
        labels: the ``labels`` passed to the forward, if any (a method that rewrites logits recomputes the loss).
        prompt_end: at the prefill, how many of this forward's positions belong to the prompt (``None``: all of
            them; fewer when the forward also carries candidate tokens after the prompt, as assisted decoding's
            first forward does). The prefill's decisions read the prompt's own last tokens.
        input_ids: this forward's token ids ``[batch, input_len]`` (``None`` when only embeddings were given).
        fired: ids of the hooks (their handles') that ran in this forward (the model checks that every hook of
            every active method did).
    """

    model: Any
    request: RequestState
    is_prefill: bool
    input_len: int
    total_len: int
    attention_mask: torch.Tensor | None
    disabled: frozenset[str] = frozenset()
    is_prompt_chunk: bool = False
    labels: torch.Tensor | None = None
    prompt_end: int | None = None
    input_ids: torch.Tensor | None = None
    fired: set[int] = field(default_factory=set)
    _last: dict[Any, Any] = field(default_factory=dict)

    @property
    def steps_generated(self) -> int:
        """Tokens generated before the one predicted at this forward's last position."""
        return self.total_len - (self.request.prefill_len or self.total_len)

    def _prompt_mask(self) -> tuple[torch.Tensor | None, int]:
        """The attention mask and length of this forward's positions up to the prompt's end (see ``prompt_end``)."""
        end = self.input_len if self.prompt_end is None else self.prompt_end
        mask = self.attention_mask
        if mask is not None and end != self.input_len:
            mask = mask[:, :end]
        return mask, end

    def last_token_index(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, real)`` of each row's last real token in this forward (at the prefill: the prompt's last
        token, see ``prompt_end``), on ``device`` (computed once per device; see
        :func:`unlearn_hf.model_inputs.last_token_index`)."""
        if device not in self._last:
            mask, end = self._prompt_mask()
            index, real = last_token_index(mask, batch, end)
            self._last[device] = (index.to(device), real.to(device))
        return self._last[device]

    def trailing_token_index(
        self, batch: int, window: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, valid)`` ``[batch, window]`` of each row's last ``window`` real tokens in this forward (at the
        prefill: up to the prompt's end, see ``prompt_end``), on ``device`` (see
        :func:`unlearn_hf.model_inputs.trailing_token_index`)."""
        key = (device, window)
        if key not in self._last:
            mask, end = self._prompt_mask()
            index, valid = trailing_token_index(None if mask is None else mask.cpu(), batch, end, window)
            self._last[key] = (index.to(device), valid.to(device))
        return self._last[key]


_CURRENT: ContextVar[ForwardContext | None] = ContextVar("unlearn_hf_forward", default=None)
_GENERATION: ContextVar[RequestState | None] = ContextVar("unlearn_hf_generation", default=None)
#: ``((model, names), ...)``: the models whose ``disable_unlearning`` block is open, each with the methods it switches
#: off (``None``: all); one entry per model, so nested blocks of several models each keep theirs.
_DISABLED: ContextVar[tuple[tuple[Any, frozenset[str] | None], ...]] = ContextVar(
    "unlearn_hf_disabled", default=()
)
#: True while activation checkpointing replays a forward in the backward pass (see :mod:`unlearn_hf.hooks`).
_REPLAY: ContextVar[bool] = ContextVar("unlearn_hf_replay", default=False)


def disabled_for(model: Any) -> frozenset[str] | None:
    """The methods of ``model`` switched off in this context (``None``: all of them)."""
    for owner, names in _DISABLED.get():
        if owner is model:
            return names
    return frozenset()


def current_context() -> ForwardContext | None:
    """The forward context of the unlearned model running in this thread/task, if any."""
    return _CURRENT.get()


def is_unlearned_model(obj: Any) -> bool:
    """Whether ``obj`` is an unlearned model (an instance of a runtime class of ``UnlearnedModelForCausalLM``),
    without importing the wrapper."""
    return hasattr(type(obj), "_unlearn_base_class")
