"""Copying an unlearned model: ``copy.deepcopy`` makes an unlearned model of its own (a copy of the base model with
the same methods attached by hooks on the copied modules); ``copy.copy`` makes another unlearned model over the same
base model; pickling (and so ``torch.save(model)``) is refused with a ``TypeError`` that points to
``save_pretrained``.

Without these, a copy would carry the original's hooks, which only fire for the original: it would silently run as
the base model.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from ..fit_context import checks_paused

logger = logging.getLogger(__name__)

#: Instance attributes a copy does not take over: the module registries and unlearning state (rebuilt), accelerate's
#: rebinding of ``forward`` (redone by ``from_base``), and compiled callables (bound to the original object).
_NOT_COPIED = frozenset(
    {
        "_modules",
        "_parameters",
        "_buffers",
        "forward",
        "_old_forward",
        "_compiled_call_impl",
        "_compiled_call",
        "_last_compile_config",
    }
)

#: The hook registries of ``nn.Module`` (all keyed by the handle ids).
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


class CopyingMixin:
    """``copy.deepcopy``, ``copy.copy`` and pickling of an unlearned model."""

    def _own_hook_ids(self) -> set[int]:
        return {h.id for a in self._unlearn_attachments.values() for h in a.hooks.handles}

    def _rebuild(self, base: Any, memo: dict[int, Any] | None) -> Any:
        """An unlearned model over ``base`` with this model's methods attached (same names, same order) and its
        own instance attributes (deep-copied with ``memo``, shallow without)."""
        sites = self._unlearn_site_override
        new = (
            type(self)
            ._wrapper_class()
            .from_base(base, sites=sites if memo is None else copy.deepcopy(sites, memo))
        )
        if memo is not None:
            memo[id(self)] = new
        # the weights as this model was wrapped, not as they are now: a copy of a fine-tuned model is fine-tuned too
        new._unlearn_wrapped_parameters = copy.deepcopy(self._unlearn_wrapped_parameters)
        own_base = self._unlearn_base.__dict__
        for key, value in self.__dict__.items():
            if key in _NOT_COPIED or key.startswith("_unlearn_") or own_base.get(key, object()) is value:
                continue  # shared with the base model: the new one has the (copied) base's
            new.__dict__[key] = value if memo is None else copy.deepcopy(value, memo)
        for registry in ("_modules", "_parameters", "_buffers"):  # members registered on the wrapper only
            base_members = own_base[registry]
            for name, member in self.__dict__[registry].items():
                if base_members.get(name, object()) is not member:
                    new.__dict__[registry][name] = member if memo is None else copy.deepcopy(member, memo)
        with checks_paused(new):
            for name, method in self._unlearn_methods.items():
                new.add_method(name, method)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """A copy of the base model with the same methods attached (fitted methods are immutable and shared)."""
        ours = self._own_hook_ids()
        base = copy.deepcopy(self._unlearn_base, memo)
        for (
            module
        ) in base.modules():  # the copied modules carry the original's hooks, which never fire for them
            for registry in _HOOK_DICTS:
                hooks = getattr(module, registry, None)
                for hook_id in ours.intersection(hooks or ()):
                    del hooks[hook_id]
        new = self._rebuild(base, memo)
        logger.debug("Deep-copied an unlearned model with methods %s.", list(self._unlearn_methods))
        return new

    def __copy__(self) -> Any:
        """Another unlearned model over the same base model (and modules), with the same methods attached."""
        return self._rebuild(self._unlearn_base, None)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            f"An unlearned model ({type(self).__qualname__}) cannot be pickled (nor saved with torch.save(model)): "
            "its class is made at run time and its methods act through hooks. Save it with "
            "model.save_pretrained(path) (save_base_model=True also writes the base model) and load it with "
            "UnlearnedModelForCausalLM.from_pretrained(path); copy it in memory with copy.deepcopy(model)."
        )
