"""Calling an unlearned model: every forward runs inside a :class:`~unlearn_hf.context.ForwardContext` that tells the
attached methods' hooks which request it belongs to and where it stands in it.

Paths that could run a forward without the methods are covered here too: the model checks after every forward that
every hook of every active method ran (a forward that bypasses module hooks raises instead of silently returning
output the methods did not act on); under ``torch.compile`` this bookkeeping runs as plain Python while the model's
own forward is compiled, with compiled code guarded on module hooks; activation checkpointing recomputes layers in
the backward pass inside the forward's context.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from ..cache_rows import follow_row_changes
from ..context import _CURRENT, _GENERATION, _REPLAY, ForwardContext, RequestState, disabled_for
from ..methods.base import AbstainingAttachment

logger = logging.getLogger(__name__)


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


def _carrying_context(checkpoint: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an activation checkpointing function (``torch.utils.checkpoint.checkpoint`` with its options, as
    ``gradient_checkpointing_enable`` sets it on every decoder layer) so that the layer's recomputation in the
    backward pass runs in the forward context it was first run in: the methods' hooks then apply again, and the
    recomputed activations are the ones the forward saved."""

    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if _CURRENT.get() is None:
            return checkpoint(function, *args, **kwargs)
        # every context variable of the forward, not only its context: a backward run after a block such as
        # NeuronAdjust.deterministic() (or on another thread) recomputed with random draws (a review)
        forward = contextvars.copy_context()
        calls = 0

        def replayable(*a: Any, **k: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:  # the forward itself, already in its context
                return function(*a, **k)

            def again() -> Any:
                _REPLAY.set(True)
                return function(*a, **k)

            return forward.copy().run(again)

        return checkpoint(replayable, *args, **kwargs)

    run._unlearn_carries_context = True
    return run


@torch.compiler.disable
def _refuse_abstaining_rows_in_training(ctx: ForwardContext, active: list[Any]) -> None:
    """A training forward (train mode, gradients on) in which a method abstains on some row is refused: the refusal
    would replace those rows' logits, giving them an infinite loss and no gradient (a relearning run on the forget
    data would learn nothing from it, silently). Rows that do not abstain train as usual."""
    rows = {}
    for a in active:
        decided = a.decision(ctx.request) if isinstance(a, AbstainingAttachment) else None
        if decided is not None and bool(decided.any()):
            rows[a.name] = int(decided.sum())
    if rows:
        raise RuntimeError(
            f"A training forward (train mode, gradients on) in which abstaining methods refuse rows ({rows}): the "
            "refusal would replace those rows' logits, giving them an infinite loss and no gradient. Train inside "
            "`with unlearned.disable_abstention():` (the methods abstain again after it), or remove them first "
            "(remove_method)."
        )


def _reset_current(token: Any) -> None:
    _CURRENT.reset(token)


_eval_frame = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
#: ``_compile_callback()`` is not ``None`` while torch.compile'd code runs (``None`` itself where torch lacks it).
_compile_callback = getattr(_eval_frame, "get_eval_frame_callback", None)


@torch.compiler.disable
def _guard_hooks_when_compiled() -> None:
    """Make compiled code check module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards = False``).

    By default, code compiled for one module instance is reused for every instance of the same class whatever
    their hooks: the decoder layers share their code, but the methods hook only some of them, so a compiled
    layer would run another layer's hooks or none. Set once, for the process, when an unlearned model is compiled.
    """
    config = torch._dynamo.config
    if config.skip_nnmodule_hook_guards:
        config.skip_nnmodule_hook_guards = False
        logger.info(
            "unlearn_hf set torch._dynamo.config.skip_nnmodule_hook_guards = False: compiled code now checks module "
            "hooks, which the unlearned model's methods are attached by."
        )


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

    # Under torch.compile, these two frames run as plain Python (the context lives in context variables, which
    # compiled graphs cannot hold); the model's own forward, which they call, is compiled.
    @functools.partial(torch.compiler.disable, recursive=False)
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._unlearned_call(super().__call__, args, kwargs)

    @functools.partial(torch.compiler.disable, recursive=False)
    def _unlearned_call(self, call: Any, args: tuple, kwargs: dict) -> Any:
        """Run ``call(*args, **kwargs)`` (the base ``__call__`` or ``forward``) with the attached methods active.

        Each call is one forward of a request (see :meth:`_forward_context`); attachments see it through
        ``on_forward_start``/``on_forward_end`` and their hooks. Outside ``generate``, the request rides on the
        returned KV cache, so a hand-written decoding loop that passes the cache back continues it.
        """
        started = self._start_forward(args, kwargs)
        if started is None:
            return call(*args, **kwargs)
        ctx, active, token = started
        try:
            if _compile_callback is not None and _compile_callback() is not None:  # called by compiled code
                _guard_hooks_when_compiled()
            return self._finish_forward(ctx, active, call(*args, **kwargs))
        finally:
            _reset_current(token)

    @torch.compiler.disable
    def _start_forward(self, args: tuple, kwargs: dict) -> tuple[ForwardContext, list[Any], Any] | None:
        """Open the forward's context (``None`` when no method is active): set it current and tell the
        attachments."""
        disabled = disabled_for(self)
        active = (
            [] if disabled is None else [a for n, a in self._unlearn_attachments.items() if n not in disabled]
        )
        if not active:
            return None
        if self.training and torch.is_grad_enabled():
            self._carry_context_into_checkpointing()
        ctx = self._forward_context(self._bind_forward(args, kwargs), disabled)
        token = _CURRENT.set(ctx)
        try:
            for attachment in active:
                attachment.on_forward_start(ctx)
        except BaseException:
            _CURRENT.reset(token)
            raise
        return ctx, active, token

    @torch.compiler.disable
    def _finish_forward(self, ctx: ForwardContext, active: list[Any], output: Any) -> Any:
        """Check that every active method ran, let the attachments amend the output, and tag the returned cache
        with the request (outside ``generate``)."""
        silent = self._silent_methods(ctx, active)
        if silent:
            raise RuntimeError(
                f"Unlearning did not run in this forward: hooks of {silent} on the model's modules were not "
                "called, so the output would not be the unlearned model's. Something ran the modules without their "
                "hooks (a graph captured without module hooks, modules replaced after the methods were attached, "
                "a skipped layer, or a copy made other than with copy.deepcopy). Call the unlearned model itself "
                "(torch.compile(model) and model.compile() keep the hooks)."
            )
        if self.training and torch.is_grad_enabled():
            _refuse_abstaining_rows_in_training(ctx, active)
        for attachment in active:
            output = attachment.on_forward_end(ctx, output)
        cache = _cache_of(output) if isinstance(output, Mapping) else None
        if cache is not None and _GENERATION.get() is None:
            with contextlib.suppress(AttributeError):  # legacy tuple caches cannot carry state
                cache._unlearn_request = ctx.request
                follow_row_changes(cache)
        return output

    def _silent_methods(self, ctx: ForwardContext, active: list[Any]) -> list[str]:
        """The active methods whose hooks did not all run in this forward (in training, where layers may be
        dropped, those none of whose hooks ran)."""
        silent = []
        for attachment in active:
            ids = [h.id for h in attachment.hooks.handles]
            missed = sum(1 for i in ids if i not in ctx.fired)
            if missed and (not self.training or missed == len(ids)):
                silent.append(f"{attachment.name} ({missed} of {len(ids)})")
        return silent

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``nn.Module.compile``: compiles the model's forward, the methods' hooks run as Python between the
        compiled graphs (so ``fullgraph=True`` is refused)."""
        if kwargs.get("fullgraph"):
            raise ValueError(
                "An unlearned model cannot be compiled with fullgraph=True: its methods' hooks run as Python between "
                "compiled graphs. Compile without fullgraph."
            )
        _guard_hooks_when_compiled()
        return super().compile(*args, **kwargs)

    def _carry_context_into_checkpointing(self) -> None:
        """Make activation checkpointing recompute layers in the forward's context (see
        :func:`_carrying_context`), whichever model it was enabled on (the modules are shared with the base)."""
        for module in self.modules():
            func = module.__dict__.get("_gradient_checkpointing_func")
            if (
                func is not None
                and getattr(module, "gradient_checkpointing", False)
                and not getattr(func, "_unlearn_carries_context", False)
            ):
                module._gradient_checkpointing_func = _carrying_context(func)
                logger.debug(
                    "Activation checkpointing of %s recomputes with unlearning.", type(module).__name__
                )

    def _forward_context(self, bound: dict[str, Any], disabled: frozenset[str]) -> ForwardContext:
        """The context of one forward: which request it belongs to and where it stands in it.

        A forward belongs to the running ``generate`` call of this model; otherwise to the request carried by
        the KV cache it is given (a hand-written decoding loop), when that cache holds a past and the forward feeds
        one token; otherwise it is a new request of its own (a plain forward over full sequences for scoring, or a
        new turn fed on a conversation's cache: its prompt is decided on). The first forward of a
        request ends its prompt (``is_prefill``), unless ``generate`` announced a longer prompt (chunked prefill).
        A first forward that runs past the announced prompt (assisted decoding verifies candidate tokens along with
        the prompt) ends the prompt at its announced length: ``prompt_end`` says where, so decisions read the
        prompt's own last tokens and generation steps count from the prompt's end.
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
        input_len = ids.shape[1]
        if request is None or request.owner is not self:
            request = getattr(cache, "_unlearn_request", None)
            # several new tokens on a cache of a past request, outside generate: a new turn of a conversation, a new
            # prompt to decide on (as generate(past_key_values=cache) does), not a decoding step of the old request
            if request is None or request.owner is not self or past == 0 or input_len > 1:
                request = RequestState(self)
        total = past + input_len
        is_prefill = is_chunk = False
        prompt_end = None
        if request.prefill_len is None:
            if request.prompt_len is not None and total < request.prompt_len:
                is_chunk = True
            else:
                is_prefill = True
                end = total
                if request.prompt_len is not None and past < request.prompt_len < total:
                    end = request.prompt_len
                    prompt_end = end - past
                request.prefill_len = end
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
            prompt_end=prompt_end,
            input_ids=bound.get("input_ids"),
        )
