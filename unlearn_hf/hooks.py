"""Hooks owned by one method of one unlearned model, gated on that model's forward context."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .context import _CURRENT, ForwardContext


class HookRegistrar:
    """Registers hooks owned by one method of one unlearned model, gated on that model's forward context.

    Only the handles created here are ever removed: other libraries' hooks on the same modules are untouched.
    """

    def __init__(self, owner: Any, method_name: str) -> None:
        self.owner = owner
        self.method_name = method_name
        self.handles: list[RemovableHandle] = []

    def forward_hook(self, module: nn.Module, fn: Callable[[ForwardContext, Any], Any]) -> None:
        """``fn(ctx, output) -> new output or None`` runs after ``module`` when the owner is being called."""
        owner, name = self.owner, self.method_name

        def hook(mod, args, output):
            ctx = _CURRENT.get()
            if ctx is None or ctx.model is not owner or name in ctx.disabled:
                return None
            return fn(ctx, output)

        self.handles.append(module.register_forward_hook(hook))

    def forward_pre_hook(self, module: nn.Module, fn: Callable[[ForwardContext, torch.Tensor], Any]) -> None:
        """``fn(ctx, first_input) -> new first input or None`` runs before ``module`` when the owner is called."""
        owner, name = self.owner, self.method_name

        def hook(mod, args):
            ctx = _CURRENT.get()
            if ctx is None or ctx.model is not owner or name in ctx.disabled:
                return None
            new = fn(ctx, args[0])
            return None if new is None else (new, *args[1:])

        self.handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
