"""Per-call state of an unlearned model: which forward is running, for which request, and whether hooks apply.

Hooks on the shared FFL modules do nothing unless the *unlearned* model is being called in the current context
(thread / asyncio task), so the plain base model and other wrappers over the same modules are unaffected, and
concurrent calls never see each other's state. State that must survive across the forward calls of one
request (prefill length, per-row abstention flags) lives in a :class:`RequestState`, held by the ``generate``
call, or attached to the KV cache for hand-written decoding loops.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
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
            before it are prompt chunks (chunked prefill) and do not end the prompt.
        eos_token_id: the end-of-sequence token of this request (``generate``'s own, when it differs from the
            model's default).
        group_size: rows that move together (``num_beams``: beam search reorders rows within a group).
        stop_when_decided: names of the abstaining methods still to decide; when the set empties the forward may
            stop early (:meth:`UnlearnedModelForCausalLM.detect` needs nothing after the decision).
        data: per-method scratch space, keyed by method name.
    """

    owner: Any
    prefill_len: int | None = None
    prompt_len: int | None = None
    eos_token_id: int | None = None
    group_size: int = 1
    stop_when_decided: set[str] | None = None
    data: dict[str, Any] = field(default_factory=dict)

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
    _last: dict[Any, Any] = field(default_factory=dict)

    @property
    def steps_generated(self) -> int:
        """Tokens generated before the one predicted at this forward's last position."""
        return self.total_len - (self.request.prefill_len or self.total_len)

    def last_token_index(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, real)`` of each row's last real token in this forward, on ``device`` (computed once per
        device; see :func:`unlearn_hf.model_inputs.last_token_index`)."""
        if device not in self._last:
            index, real = last_token_index(self.attention_mask, batch, self.input_len)
            self._last[device] = (index.to(device), real.to(device))
        return self._last[device]

    def trailing_token_index(
        self, batch: int, window: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, valid)`` ``[batch, window]`` of each row's last ``window`` real tokens in this forward, on
        ``device`` (see :func:`unlearn_hf.model_inputs.trailing_token_index`)."""
        key = (device, window)
        if key not in self._last:
            mask = None if self.attention_mask is None else self.attention_mask.cpu()
            index, valid = trailing_token_index(mask, batch, self.input_len, window)
            self._last[key] = (index.to(device), valid.to(device))
        return self._last[key]


_CURRENT: ContextVar[ForwardContext | None] = ContextVar("unlearn_hf_forward", default=None)
_GENERATION: ContextVar[RequestState | None] = ContextVar("unlearn_hf_generation", default=None)
_DISABLED: ContextVar[tuple[Any, frozenset[str] | None] | None] = ContextVar(
    "unlearn_hf_disabled", default=None
)


def current_context() -> ForwardContext | None:
    """The forward context of the unlearned model running in this thread/task, if any."""
    return _CURRENT.get()


def is_unlearned_model(obj: Any) -> bool:
    """Whether ``obj`` is an unlearned model (an instance of a runtime class of ``UnlearnedModelForCausalLM``),
    without importing the wrapper."""
    return hasattr(type(obj), "_unlearn_base_class")
