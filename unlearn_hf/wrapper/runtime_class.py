"""The runtime class of an unlearned model: a class made on the fly that subclasses both the wrapper class and
the base model's own class (e.g. ``LlamaForCausalLM``), and the construction of an instance over a base model."""

from __future__ import annotations

import functools
import types
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from ..adapters import check_no_adapters
from ..context import _CURRENT
from ..persistence.fingerprint import parameter_records
from ..sites import find_ffl_sites


def _forward_passthrough(base_cls: type) -> Any:
    """``forward`` of a runtime class: applies the attached methods when ``forward`` is called directly (not through
    ``__call__``, which already did), with the base class's signature so ``transformers`` inspects it unchanged."""
    base_forward = base_cls.forward

    @functools.wraps(base_forward)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ctx = _CURRENT.get()
        if ctx is not None and ctx.model is self:  # inside __call__ (or a nested call of the same model)
            return base_forward(self, *args, **kwargs)
        return self._unlearned_call(functools.partial(base_forward, self), args, kwargs)

    # plain Python under torch.compile (it reads a context variable); the base forward it calls is compiled
    return functools.wraps(base_forward)(torch.compiler.disable(forward, recursive=False))


class RuntimeClassMixin:
    """Builds and caches the runtime classes, and wraps a base model into an instance of one (sharing its modules,
    parameters, buffers and config; the base model object itself is left unchanged)."""

    _dynamic_classes: ClassVar[dict[tuple[type, type], type]] = {}

    @classmethod
    def from_base(cls, model: PreTrainedModel, sites: Any = None):
        """Wrap ``model`` (any ``AutoModelForCausalLM`` instance) with nothing attached yet.

        Args:
            model: the base model; it is not modified and remains usable as the plain model.
            sites: optional override of the FFL sites (see :func:`unlearn_hf.sites.find_ffl_sites`).
        """
        if isinstance(model, RuntimeClassMixin):
            raise TypeError(
                "This model is already an UnlearnedModelForCausalLM; attach more methods to it directly."
            )
        if not isinstance(model, PreTrainedModel):
            check_no_adapters(model, "wrap this model")  # a PEFT model: say how to get a plain one
            raise TypeError(
                f"Expected a transformers PreTrainedModel (a causal LM), got {type(model).__name__}."
            )
        check_no_adapters(model, "wrap this model")
        if not model.can_generate():
            raise TypeError(f"{type(model).__name__} is not a generative (causal LM) model.")
        dyn = cls._dynamic_class(type(model))
        obj = object.__new__(dyn)
        obj.__dict__.update(model.__dict__)  # shares submodules, parameters, buffers, config and hooks
        for name in ("_modules", "_parameters", "_buffers"):  # own top-level registries, same members
            obj.__dict__[name] = type(model.__dict__[name])(model.__dict__[name])
        # a plain attribute (not a registered child module): the base must not become a submodule of itself
        object.__setattr__(obj, "_unlearn_base", model)
        fwd = model.__dict__.get("forward")
        if "_old_forward" in model.__dict__ and isinstance(fwd, functools.partial):
            # accelerate's hook put `forward = partial(new_forward, base)` on the instance: rebind it to the
            # wrapper so that a direct `unlearned.forward(...)` also runs with unlearning
            obj.__dict__["_old_forward"] = types.MethodType(dyn.forward, obj)
            obj.__dict__["forward"] = functools.update_wrapper(
                functools.partial(fwd.func, obj), obj._old_forward
            )
        obj._unlearn_site_override = sites
        # named sites are checked now: a name that is not in the model failed only at the first fit (a review)
        obj._unlearn_sites = None if sites is None else find_ffl_sites(model, sites)
        # the weights as wrapped, to tell a save that they changed since (fine-tuning, merged adapters)
        obj._unlearn_wrapped_parameters = parameter_records(model)
        obj._unlearn_methods = {}
        obj._unlearn_attachments = {}
        obj._unlearn_checks_paused = 0  # see unlearn_hf.fit_context
        obj._unlearn_context_warned = set()
        return obj

    def __setattr__(self, name: str, value: Any) -> None:
        """As ``nn.Module``'s; replacing a top-level member the base model shares (``resize_token_embeddings``
        sets a new ``lm_head``) replaces it in the base too, so that the two stay one model (a full save writes the
        base's modules). A new member set on the wrapper stays the wrapper's."""
        super().__setattr__(name, value)
        base = self.__dict__.get("_unlearn_base")
        if base is None:
            return
        for registry in ("_modules", "_parameters", "_buffers"):
            mine, theirs = self.__dict__[registry], base.__dict__[registry]
            if name in mine and name in theirs and mine[name] is not theirs[name]:
                setattr(base, name, value)

    @property
    def training(self) -> bool:
        """The base model's training flag: the two share every submodule, and now the flag too (``base.train()``
        puts the wrapper in training mode, which activation checkpointing's recomputation reads)."""
        return self._unlearn_base.training

    @training.setter
    def training(self, mode: bool) -> None:
        self._unlearn_base.training = mode

    @classmethod
    def _dynamic_class(cls, base_cls: type) -> type:
        key = (cls, base_cls)
        if key not in cls._dynamic_classes:
            cls._dynamic_classes[key] = type(
                base_cls.__name__,
                (cls, base_cls),
                {
                    "__module__": base_cls.__module__,
                    "__qualname__": f"{cls.__qualname__}[{base_cls.__name__}]",
                    "__doc__": cls.__doc__,
                    "_unlearn_base_class": base_cls,
                },
            )
        return cls._dynamic_classes[key]

    @classmethod
    def _wrapper_class(cls) -> type:
        """The user-facing class (``UnlearnedModelForCausalLM`` or a user subclass) behind a runtime class."""
        return cls.__bases__[0] if "_unlearn_base_class" in cls.__dict__ else cls

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base_cls = cls.__dict__.get("_unlearn_base_class")
        wrapper_mro = [c for c in cls.__mro__[1:] if issubclass(c, RuntimeClassMixin)]
        if base_cls is not None and not any("forward" in c.__dict__ for c in wrapper_mro):
            cls.forward = _forward_passthrough(base_cls)
