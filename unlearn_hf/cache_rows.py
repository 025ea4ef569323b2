"""A KV cache that carries a request out of a forward (a hand-written decoding loop) keeps the request's per-row
state (abstention decisions) in step with its rows through the cache's own batch operations: ``batch_select_indices``
(dropping finished rows), ``batch_repeat_interleave`` (one prompt's prefill expanded into several samples) and
``reorder_cache`` (a hand-written beam search). Key Space Detection refuses a later forward whose row count differs
from its decisions' (rows changed some other way)."""

from __future__ import annotations

import types
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
    (``cache._unlearn_request``) at each call, once per cache (bound methods in the instance: a deep copy of the cache
    rebinds them to the copy)."""
    if vars(cache).get("_unlearn_follows_rows"):
        return
    for name, kind in _ROW_METHODS.items():
        original = getattr(type(cache), name, None)
        if callable(original):
            setattr(cache, name, types.MethodType(_following(original, kind), cache))
    cache._unlearn_follows_rows = True


def _following(original: Callable, kind: str) -> Callable:
    def method(self, arg, *args, **kwargs):
        out = original(self, arg, *args, **kwargs)
        request = getattr(self, "_unlearn_request", None)
        if request is not None:
            request.select_rows(rows_op(kind, arg))
        return out

    method.__name__, method.__doc__ = original.__name__, original.__doc__
    return method
