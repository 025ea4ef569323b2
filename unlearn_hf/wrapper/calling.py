"""Calling an unlearned model: every forward runs inside a :class:`~unlearn_hf.context.ForwardContext` that tells the
attached methods' hooks which request it belongs to and where it stands in it."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

from ..context import _CURRENT, _DISABLED, _GENERATION, ForwardContext, RequestState


def _cache_of(values: Mapping[str, Any]) -> Any:
    """The KV cache among forward arguments or outputs (``cache`` in transformers 5, ``past_key_values`` before).

    Only keys that are really present are read: asking a transformers 5 ``ModelOutput`` for ``past_key_values``
    would log a deprecation warning.
    """
    keys = values.keys()
    for key in ("cache", "past_key_values"):
        if key in keys and values[key] is not None:
            return values[key]
    return None


class CallingMixin:
    """``__call__`` (and, through the runtime class, ``forward``) with the attached methods active."""

    _signatures: ClassVar[dict[Any, inspect.Signature]] = {}

    def _signature(self, name: str) -> inspect.Signature:
        """The signature of the base class's ``name`` method (cached per class)."""
        base_cls = type(self)._unlearn_base_class
        sig = self._signatures.get((base_cls, name))
        if sig is None:
            sig = self._signatures[(base_cls, name)] = inspect.signature(getattr(base_cls, name))
        return sig

    def _bind_forward(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The forward's arguments by name (keyword-only calls, as ``generate`` makes, need no binding)."""
        if not args:
            return kwargs
        return self._signature("forward").bind_partial(None, *args, **kwargs).arguments

    def _disabled_names(self) -> frozenset[str] | None:
        """Methods switched off in this context; ``None`` when all are."""
        state = _DISABLED.get()
        if state is None or state[0] is not self:
            return frozenset()
        return state[1]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._unlearned_call(super().__call__, args, kwargs)

    def _unlearned_call(self, call: Any, args: tuple, kwargs: dict) -> Any:
        """Run ``call(*args, **kwargs)`` (the base ``__call__`` or ``forward``) with the attached methods active.

        Each call is one forward of a request (see :meth:`_forward_context`); attachments see it through
        ``on_forward_start``/``on_forward_end`` and their hooks. Outside ``generate``, the request rides on the
        returned KV cache, so a hand-written decoding loop that passes the cache back continues it.
        """
        disabled = self._disabled_names()
        active = (
            [] if disabled is None else [a for n, a in self._unlearn_attachments.items() if n not in disabled]
        )
        if not active:
            return call(*args, **kwargs)
        ctx = self._forward_context(self._bind_forward(args, kwargs), disabled)
        token = _CURRENT.set(ctx)
        try:
            for attachment in active:
                attachment.on_forward_start(ctx)
            output = call(*args, **kwargs)
            for attachment in active:
                output = attachment.on_forward_end(ctx, output)
        finally:
            _CURRENT.reset(token)
        cache = _cache_of(output) if isinstance(output, Mapping) else None
        if cache is not None and _GENERATION.get() is None:
            with contextlib.suppress(AttributeError):  # legacy tuple caches cannot carry state
                cache._unlearn_request = ctx.request
        return output

    def _forward_context(self, bound: dict[str, Any], disabled: frozenset[str]) -> ForwardContext:
        """The context of one forward: which request it belongs to and where it stands in it.

        A forward belongs to the running ``generate`` call of this model; otherwise to the request carried by
        the KV cache it is given (a hand-written decoding loop), when that cache holds a past; otherwise it is a
        new request of its own (e.g. a plain forward over full sequences for scoring). The first forward of a
        request ends its prompt (``is_prefill``), unless ``generate`` announced a longer prompt (chunked prefill).
        """
        ids = bound.get("input_ids")
        if ids is None:
            ids = bound.get("inputs_embeds")
        if ids is None:
            raise ValueError("The unlearned model needs input_ids or inputs_embeds.")
        extra = bound.get("kwargs", {})
        cache = _cache_of({**extra, **bound})
        past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        request = _GENERATION.get()
        if request is None or request.owner is not self:
            request = getattr(cache, "_unlearn_request", None)
            if request is None or request.owner is not self or past == 0:
                request = RequestState(self)
        input_len = ids.shape[1]
        total = past + input_len
        is_prefill = is_chunk = False
        if request.prefill_len is None:
            if request.prompt_len is not None and total < request.prompt_len:
                is_chunk = True
            else:
                is_prefill = True
                request.prefill_len = total
        mask = bound.get("attention_mask")
        if mask is not None:
            if mask.ndim != 2:
                mask = None  # 4D custom masks: treat every position as real
            else:
                mask = mask[:, -input_len:]
        labels = bound.get("labels", extra.get("labels"))
        return ForwardContext(
            self,
            request,
            is_prefill,
            input_len,
            total,
            mask,
            disabled,
            is_prompt_chunk=is_chunk,
            labels=labels,
        )
