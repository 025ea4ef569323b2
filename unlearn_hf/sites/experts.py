"""The sites of a mixture-of-experts layer (``docs/ARCHITECTURES.md``, "Mixtures of experts").

transformers 5 stores a layer's experts in one module with 3-D weights (``gate_up_proj`` ``[E, 2I, h]`` or
``up_proj``, and ``down_proj``; DBRX: stacked 2-D weights), called with the top-k experts of each token, or (Llama 4)
with every expert's rows pre-scaled (:mod:`.expert_layouts`). Expert ``e`` of such a module has the two sites of an
FFL, over the tokens routed to it only:

* pre-activation: the output of its up (or fused gate/up) projection, ``[n_e, 2I]`` (the gate columns, in the
  module's layout, are what enters the activation; DBRX: its gate projection's output, ``[n_e, I]``);
* key: the input of its down projection, ``[n_e, I]``.

No module computes them alone, so each is an :class:`ExpertTap`: an identity module (not registered in the model)
that the experts module calls with the values and the indices of their tokens, while a hook on one of its taps
would run (the probe's always; a method's while its unlearned model is being called and the method has work in
that forward). The methods hook taps as they hook real modules. When a hook that may change values would run, the
module runs :func:`tapped_experts_forward`, the eager computation of transformers, checked against the module's
own forward when the taps are installed. Otherwise it runs its own forward (any experts implementation,
accelerate's offloading hooks) untouched, and when hooks that only read would run (Key Space Detection's), it
computes their sites beside it as the eager loop does (:func:`observe_expert_sites`): its output stays bit for bit
its own.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..context import _CURRENT
from . import expert_layouts as layouts
from .expert_layouts import ExpertsLayout, experts_layout
from .ffl_site import SiteError
from .site_tensors import module_device

_TAPS = "_unlearn_expert_taps"


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module of one of the layouts of :mod:`.expert_layouts`."""
    return experts_layout(module) is not None


class ExpertTap(nn.Module):
    """One site of one expert: ``forward(values, token_index)`` returns ``values``; hooks see both.

    Args:
        owner: the experts module.
        expert: the expert's index.
        role: ``"pre"`` or ``"key"``.
        in_features / out_features: the widths of the projection the site belongs to (the up projection for
            ``pre``, the down projection for ``key``), so that shape checks treat it as that projection.
    """

    def __init__(
        self, owner: nn.Module, expert: int, role: str, in_features: int, out_features: int, hooked: set
    ) -> None:
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not a submodule: the experts module owns the tap
        object.__setattr__(self, "_hooked", hooked)  # the taps of its module that were ever given a hook
        self.expert, self.role = expert, role
        self.in_features, self.out_features = in_features, out_features

    def forward(self, values: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        return values

    def register_forward_hook(self, *args: Any, **kwargs: Any):
        self._hooked.add(self)
        return super().register_forward_hook(*args, **kwargs)

    def register_forward_pre_hook(self, *args: Any, **kwargs: Any):
        self._hooked.add(self)
        return super().register_forward_pre_hook(*args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The expert's slice of its projection's weight (for fingerprints and dtypes)."""
        return layouts.expert_weight(self.owner, self.owner.__dict__[_TAPS].layout, self.role, self.expert)

    def extra_repr(self) -> str:
        return f"expert={self.expert}, role={self.role}, in={self.in_features}, out={self.out_features}"


class ExpertTaps:
    """The taps of one experts module, and the switch of its forward to :func:`tapped_experts_forward`."""

    def __init__(self, module: nn.Module, layout: ExpertsLayout) -> None:
        self.module, self.layout = module, layout
        hidden, width = layouts.expert_widths(module, layout)
        up = 2 * width if layout.has_gate else width
        self.width = width
        #: the taps that were ever given a hook: all that :meth:`active` looks at, on every call of the module
        self.hooked: set[ExpertTap] = set()
        self.pre = [ExpertTap(module, e, "pre", hidden, up, self.hooked) for e in range(module.num_experts)]
        self.key = [
            ExpertTap(module, e, "key", width, hidden, self.hooked) for e in range(module.num_experts)
        ]

    @property
    def gate(self) -> str | None:
        """The layout of the gate in a fused expert output (see :data:`~.ffl_site.GATE_LAYOUTS`)."""
        return self.layout.gate

    def tokens(self, args: tuple) -> int:
        """How many tokens a call of the module with positional ``args`` computes."""
        return layouts.token_count(self.module, self.layout, args)

    def mode(self) -> str | None:
        """How the module must run now: ``"tapped"`` (the tapped computation) when a hook that may change values
        would run (a method's only while its unlearned model is being called and the method has work in this
        forward, see :mod:`unlearn_hf.hooks`; any other hook, as the probe's, always); ``"observe"`` when only
        hooks that read would (the module's own forward, then the sites computed beside it); else ``None``."""
        observe = False
        for tap in self.hooked:
            for hooks in (tap._forward_hooks, tap._forward_pre_hooks):
                for hook in hooks.values():
                    would_run = getattr(hook, "unlearn_would_run", None)
                    if would_run is None or would_run():
                        if not getattr(hook, "unlearn_observer", False):
                            return "tapped"
                        observe = True
        return "observe" if observe else None

    def mark_considered(self) -> None:
        """Record in the forward's context that every tap's hooks ran: the module was called, and a hook not called
        had nothing to do (an expert without tokens, a method with no work in this forward)."""
        ctx = _CURRENT.get()
        if ctx is not None:
            for tap in self.hooked:
                ctx.fired.update(tap._forward_hooks)
                ctx.fired.update(tap._forward_pre_hooks)

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        """A copy of the model gets no taps (it runs its own forward) until its sites are found: then taps of its
        own, without the original's hooks."""
        return None


class _ExpertsForward:
    """The forward of an experts module with taps: the tapped computation while a hook that may change values would
    run, else the forward it had (``inner``: accelerate's offloading forward, or ``None`` for the class's),
    untouched, followed by the sites that reading hooks want (see :meth:`ExpertTaps.mode`). An object, not a bound
    method, so that the model still pickles and deep-copies.

    With accelerate's hooks on the module, this replaces its ``_old_forward`` (the innermost call), so weights
    are still brought in before and sent back after."""

    def __init__(self, module: nn.Module, inner: Any = None) -> None:
        self.module, self.inner = module, inner
        self.force: bool | None = None  # the equivalence check runs each path on purpose

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.module
        taps = module.__dict__.get(_TAPS)
        if taps is None:
            mode = None
        else:
            mode = taps.mode() if self.force is None else ("tapped" if self.force else None)
        if mode == "tapped":
            out = tapped_experts_forward(module, taps, *_positional(module, args, kwargs))
        else:
            out = (
                self.inner(*args, **kwargs)
                if self.inner is not None
                else type(module).forward(module, *args, **kwargs)
            )
            if mode == "observe":
                observe_expert_sites(module, taps, *_positional(module, args, kwargs))
        if taps is not None and taps.hooked:
            taps.mark_considered()
        return out


def _positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """The arguments of a call of the experts module, all positional (in the order of its class's forward)."""
    if not kwargs:
        return args
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    return tuple(bound.arguments.values())[1:]


def expert_taps(module: nn.Module) -> ExpertTaps:
    """The taps of an experts module, installed on first use and checked against the module's own forward.

    Raises:
        SiteError: the module's forward is not the eager computation the taps run (nothing is left installed).
    """
    taps = module.__dict__.get(_TAPS)
    if taps is not None:
        return taps
    slot = "_old_forward" if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__ else "forward"
    previous = module.__dict__.get(slot)
    forward = previous if isinstance(previous, _ExpertsForward) else _ExpertsForward(module, previous)
    module.__dict__[slot] = forward
    module.__dict__[_TAPS] = taps = ExpertTaps(module, experts_layout(module))
    try:
        _check_equivalent(module, taps.layout, forward)
    except BaseException:
        module.__dict__.pop(_TAPS)
        if previous is None:
            module.__dict__.pop(slot)
        else:
            module.__dict__[slot] = previous
        raise
    return taps


def tapped_experts_forward(self: nn.Module, taps: ExpertTaps, *args: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts computation, calling the taps of every expert that has tokens."""
    layout = taps.layout
    # rows [tokens, h]: DBRX's experts take (and give) [batch, seq, h]
    out = torch.zeros_like(args[0]).view(-1, args[0].shape[-1])
    blocks = out.view(self.num_experts, -1, out.shape[-1]) if layout.routing == "scaled_rows" else None
    for e, token_index, x, weights in layouts.routed(self, layout, args):
        h = taps.pre[e](layouts.up(self, layout, e, x), token_index)
        h = taps.key[e](layouts.activate(self, layout, e, x, h), token_index)
        y = layouts.down(self, layout, e, h)
        if blocks is not None:
            blocks[e].index_copy_(0, token_index, y.to(out.dtype))
        else:
            out.index_add_(0, token_index, (y * weights).to(out.dtype))
    return out.view(args[0].shape)


def observe_expert_sites(self: nn.Module, taps: ExpertTaps, *args: torch.Tensor) -> None:
    """The sites of the experts whose taps have hooks, computed as :func:`tapped_experts_forward` computes them
    (the same rows, the same operations), for hooks that only read: the module's output is its own forward's."""
    layout = taps.layout
    for e, token_index, x, _ in layouts.routed(self, layout, args):
        pre, key = taps.pre[e], taps.key[e]
        if pre not in taps.hooked and key not in taps.hooked:
            continue
        h = pre(layouts.up(self, layout, e, x), token_index)
        if key in taps.hooked:
            key(layouts.activate(self, layout, e, x, h), token_index)


def _check_equivalent(module: nn.Module, layout: ExpertsLayout, forward: _ExpertsForward) -> None:
    """Refuse an experts module whose own forward is not the eager computation the taps run (both called through
    the module, on random tokens routed to every expert)."""
    weight = layouts.expert_weight(module, layout, "key", 0)
    if weight.is_meta and not hasattr(module, "_hf_hook"):
        return  # not materialized: nothing can run
    device = module_device(module)
    args = layouts.random_call(module, layout, device, weight.dtype)
    results = []
    try:
        with torch.no_grad():
            for force in (False, True):
                forward.force = force
                results.append(module(*args))
    finally:
        forward.force = None
    own, ours = (
        r.float().reshape(-1, r.shape[-1]) for r in results
    )  # DBRX gives [tokens, 1, h] for [tokens, h]
    tol = max(1e-4, 8 * torch.finfo(weight.dtype).eps)
    if not torch.allclose(own, ours, rtol=tol, atol=tol * float(own.abs().mean()) + 1e-6):
        raise SiteError(
            f"The experts module {type(module).__name__} does not compute transformers' eager experts function "
            "(its output differs from the tapped computation), so its expert sites cannot be read. Name one dense "
            "projection pair per layer with a site override instead."
        )
