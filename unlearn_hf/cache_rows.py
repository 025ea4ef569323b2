"""A KV cache that carries a request out of a forward (a hand-written decoding loop) keeps the request's per-row
state (abstention decisions) in step with its rows through the cache's own batch operations: ``batch_select_indices``
(dropping finished rows), ``batch_repeat_interleave`` (one prompt's prefill expanded into several samples) and
``reorder_cache`` (a hand-written beam search). Key Space Detection refuses a later forward whose row count differs
from its decisions' while a row abstains (rows changed some other way)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

#: The cache methods that change its rows, and how: ``"select"`` (an index, or a boolean mask, of the rows kept, in
#: their new order) or ``"repeat"`` (each row repeated in place).
_ROW_METHODS = {
    "batch_select_indices": "select",
    "reorder_cache": "select",
    "batch_repeat_interleave": "repeat",
}

#: Per cache class, its subclass whose row-changing methods follow (see :func:`follow_row_changes`).
_FOLLOWING: dict[type, type] = {}


def rows_op(kind: str, arg: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The change of rows a cache method made, as a function of a ``[rows, ...]`` tensor."""
    if kind == "repeat":
        return lambda t: t.repeat_interleave(int(arg), 0)
    index = torch.as_tensor(arg)
    if index.dtype == torch.bool:
        index = index.nonzero().squeeze(1)
    index = index.to("cpu", torch.long)
    return lambda t: t.index_select(0, index.to(t.device))


def follow_row_changes(cache: Any) -> None:
    """Make ``cache``'s row-changing methods apply the same change to the request it carries
    (``cache._unlearn_request``) at each call: the cache becomes an instance of a subclass of its class that overrides
    them (made once per class; copies of the cache keep it, and nothing in the cache refers back to it). A class whose
    instances cannot change class (``__slots__``) is left as it is."""
    cls = type(cache)
    if getattr(cls, "_unlearn_follows_rows", False):
        return
    sub = _FOLLOWING.get(cls)
    if sub is None:
        methods = {
            name: _following(getattr(cls, name), kind)
            for name, kind in _ROW_METHODS.items()
            if callable(getattr(cls, name, None))
        }
        names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
        sub = _FOLLOWING[cls] = type(
            cls.__name__, (cls,), {**methods, **names, "_unlearn_follows_rows": True}
        )
    try:
        cache.__class__ = sub
    except TypeError:  # another memory layout
        pass


def _following(original: Callable, kind: str) -> Callable:
    param = list(inspect.signature(original).parameters)[1]  # indices / beam_idx / repeats

    def method(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        request = getattr(self, "_unlearn_request", None)
        if request is not None:
            request.select_rows(rows_op(kind, args[0] if args else kwargs[param]))
        return out

    method.__name__, method.__doc__ = original.__name__, original.__doc__
    method.__signature__ = inspect.signature(original)
    return method
