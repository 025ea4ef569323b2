"""Hooks owned by one method of one unlearned model, gated on that model's forward context.

Every hook:

* runs only when its owner is the model being called in the current thread/task (see :mod:`unlearn_hf.context`),
  and records in the forward's context that it ran (the model checks after the forward that every hook of every
  active method did, so a path that bypasses module hooks fails loudly instead of running the base model);
* runs as plain Python under ``torch.compile`` (``torch.compiler.disable``): a compiled model breaks its graph
  around each hooked module and applies the methods exactly as in eager mode;
* runs again when activation checkpointing recomputes a layer in the backward pass (the unlearned model carries
  the forward's context into the recomputation), unless it is an *observer* (it only reads, e.g. a decision):
  observers run without autograd and only once.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .context import _CURRENT, _REPLAY, ForwardContext

#: Why compiled code calls the hooks as plain Python (shown by ``torch.compile(..., fullgraph=True)``, which cannot).
_EAGER = (
    "unlearn_hf: an unlearning method's hook runs as Python between compiled graphs, so an unlearned model cannot "
    "be compiled with fullgraph=True"
)


class HookRegistrar:
    """Registers hooks owned by one method of one unlearned model, gated on that model's forward context.

    Only the handles created here are ever removed: other libraries' hooks on the same modules are untouched.
    """

    def __init__(self, owner: Any, method_name: str) -> None:
        self.owner = owner
        self.method_name = method_name
        self.handles: list[RemovableHandle] = []
        self._live: list[_Live] = []
        # a wrapper dropped without remove_method: its hooks leave the shared modules when it is collected
        weakref.finalize(self, _remove_handles, self.handles)

    def _runs(self, observer: bool) -> Callable[[], ForwardContext | None]:
        """``runs()``: the forward context when a hook of this method must run now (its model is being called,
        the method is not disabled, an observer not in a recomputation), else ``None``."""
        owner, name = self.owner, self.method_name

        def runs() -> ForwardContext | None:
            ctx = _CURRENT.get()
            if ctx is None or ctx.model is not owner or name in ctx.disabled:
                return None
            if observer and _REPLAY.get():
                return None
            return ctx

        return runs

    def _add(self, handle: RemovableHandle, handle_id: list[int]) -> None:
        handle_id.append(handle.id)
        self.handles.append(handle)

    def forward_hook(
        self,
        module: nn.Module,
        fn: Callable[[ForwardContext, Any], Any],
        *,
        observer: bool = False,
        when: Callable[[ForwardContext], bool] | None = None,
    ) -> None:
        """``fn(ctx, output) -> new output or None`` runs after ``module`` when the owner is being called (``when``:
        see :meth:`_register`)."""
        self._register(module, fn, observer, pre=False, when=when)

    def forward_pre_hook(
        self,
        module: nn.Module,
        fn: Callable[[ForwardContext, Any], Any],
        *,
        observer: bool = False,
        all_inputs: bool = False,
        when: Callable[[ForwardContext], bool] | None = None,
    ) -> None:
        """``fn(ctx, first_input) -> new first input or None`` runs before ``module`` when the owner is called
        (``all_inputs=True``, observers only: ``fn(ctx, inputs)`` with the tuple of positional inputs; ``when``:
        and only in the forwards it accepts, see :meth:`_register`)."""
        if all_inputs and not observer:
            raise ValueError("Only an observer hook can be given all inputs (it returns nothing).")
        self._register(module, fn, observer, pre=True, all_inputs=all_inputs, when=when)

    def _register(
        self,
        module: nn.Module,
        fn: Callable,
        observer: bool,
        *,
        pre: bool,
        all_inputs: bool = False,
        when: Callable[[ForwardContext], bool] | None = None,
    ) -> None:
        """Register the gated hook. With ``observer=True``, ``fn`` only reads (returns ``None``): it runs without
        autograd and not in activation checkpointing's recomputation. ``when(ctx)`` false: ``fn`` has nothing to
        do in this forward (the hook counts as run). The hook tells expert taps (:mod:`unlearn_hf.sites.experts`)
        whether it would do something now (``unlearn_would_run()``) and whether it only reads
        (``unlearn_observer``)."""
        handle_id: list[int] = []
        # what the hook calls, reached through a weak reference: the module (and so the base model, which outlives
        # its wrappers) must not keep the owner alive; once the owner is gone, its hooks do nothing until the
        # registrar's finalizer removes them
        live = _Live(self._runs(observer), fn, when)
        self._live.append(live)
        ref = weakref.ref(live)
        no_grad = torch.no_grad

        # one function calling ``runs`` (no further helper frames): inside a decode step every Python frame runs on
        # cold caches, and a hook runs on every hooked module of every step
        @functools.partial(torch.compiler.disable, reason=_EAGER)
        def hook(mod, args, *output):
            target = ref()
            if target is None:
                return None
            ctx = target.runs()
            if ctx is None:
                return None
            ctx.fired.add(handle_id[0])
            if target.when is not None and not target.when(ctx):
                return None
            value = (args if all_inputs else args[0]) if pre else output[0]
            if observer:
                with no_grad():
                    target.fn(ctx, value)
                return None
            new = target.fn(ctx, value)
            return new if not pre or new is None else (new, *args[1:])

        def would_run() -> bool:
            target = ref()
            ctx = None if target is None else target.runs()
            return ctx is not None and (target.when is None or target.when(ctx))

        hook.unlearn_would_run, hook.unlearn_observer = would_run, observer
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._add(register(hook), handle_id)

    def remove(self) -> None:
        _remove_handles(self.handles)
        self._live.clear()


class _Live:
    """What one registered hook calls (see :meth:`HookRegistrar._register`)."""

    __slots__ = ("runs", "fn", "when", "__weakref__")

    def __init__(self, runs: Callable, fn: Callable, when: Callable | None) -> None:
        self.runs, self.fn, self.when = runs, fn, when


def _remove_handles(handles: list[RemovableHandle]) -> None:
    for h in handles:
        h.remove()
    handles.clear()


#: The pass (:class:`PassHooks`) whose forward is running in this thread/task, if any.
_PASS: ContextVar[object | None] = ContextVar("unlearn_hf_pass", default=None)


class PassHooks:
    """Plain hooks of one pass of the library over a model (a probe, a calibration), which run only inside that
    pass's own forwards (:meth:`running`): another thread's or task's forward through the same modules (the base
    model being served, another wrapper of it) never reaches them, so it neither feeds the pass's statistics nor
    meets its early stop (:class:`~unlearn_hf.model_inputs.StopForward`).

    ``fn`` is called as a module hook is (``fn(module, args)`` before, ``fn(module, args, output)`` after); an
    ``unlearn_observer`` attribute on it is kept (see :mod:`unlearn_hf.sites.experts`).
    """

    def __init__(self) -> None:
        self._token = object()
        self.handles: list[RemovableHandle] = []

    def _gated(self, fn: Callable) -> Callable:
        token = self._token

        def hook(*args):
            return fn(*args) if _PASS.get() is token else None

        hook.unlearn_would_run = lambda: _PASS.get() is token
        hook.unlearn_observer = getattr(fn, "unlearn_observer", False)
        return hook

    def pre(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args)`` before ``module``, in this pass's forwards."""
        self.handles.append(module.register_forward_pre_hook(self._gated(fn)))

    def post(self, module: nn.Module, fn: Callable) -> None:
        """``fn(module, args, output)`` after ``module``, in this pass's forwards."""
        self.handles.append(module.register_forward_hook(self._gated(fn)))

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Within the block (this thread/task), forwards are this pass's: its hooks run."""
        reset = _PASS.set(self._token)
        try:
            yield
        finally:
            _PASS.reset(reset)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
