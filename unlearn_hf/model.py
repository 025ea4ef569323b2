"""``UnlearnedModelForCausalLM``: a causal LM with unlearning methods attached through hooks."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import types
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .data import DataSpec
from .methods.base import METHOD_CLASSES, MethodConfig, UnlearningMethod
from .probe import position_ids_from_mask
from .runtime import (
    _CURRENT,
    _DISABLED,
    _GENERATION,
    ForwardContext,
    HookRegistrar,
    RequestState,
    StopForward,
)
from .sites import FFLSite, SiteOverride, find_ffl_sites

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


def _forward_passthrough(base_cls: type) -> Any:
    """``forward`` of a dynamic class: applies the attached methods when ``forward`` is called directly (not through
    ``__call__``, which already did), with the base class's signature so ``transformers`` inspects it unchanged."""
    base_forward = base_cls.forward

    @functools.wraps(base_forward)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ctx = _CURRENT.get()
        if ctx is not None and ctx.model is self:  # inside __call__ (or a nested call of the same model)
            return base_forward(self, *args, **kwargs)
        return self._unlearned_call(functools.partial(base_forward, self), args, kwargs)

    return forward


class UnlearnedModelForCausalLM:
    """A causal LM whose skills can be unlearned by attached methods (Neuron Adjust, Key Space Detection,
    Selective Pruning), without changing a single weight.

    **Mechanism.** :meth:`from_base` returns an object of a class created on the fly that subclasses both this
    class and the base model's own class (e.g. ``LlamaForCausalLM``), sharing the base model's modules,
    parameters and config. We chose this over a PEFT-style wrapper because it keeps everything the ecosystem
    checks working unchanged: ``isinstance(m, LlamaForCausalLM)`` and ``isinstance(m, PreTrainedModel)`` hold,
    ``generate`` and ``pipeline("text-generation")`` run their normal code (the class keeps the base class's
    ``__name__``, which pipelines use to accept the model), ``save_pretrained`` writes a config whose
    ``architectures`` loads with plain ``transformers``. The original object is left as it was: it stays the
    plain base model (``unlearned.base_model``), because every hook we add is gated on the unlearned object being
    the one called, in the current thread or task (see :mod:`unlearn_hf.runtime`).

    **Subclassing.** Subclass this class (not the dynamic one) and call ``MySubclass.from_base(model)``. Override
    :attr:`method_classes` to swap in your own method implementations (e.g. a ``NeuronAdjust`` subclass with
    another replacement rule), or :meth:`combine_abstention` to change how several abstaining methods vote.
    """

    #: method_type -> implementation used by :meth:`fit` and loading. Override in subclasses.
    method_classes: ClassVar[Mapping[str, type[UnlearningMethod]]] = METHOD_CLASSES
    _dynamic_classes: ClassVar[dict[tuple[type, type], type]] = {}
    _forward_signatures: ClassVar[dict[Any, inspect.Signature]] = {}

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_base(cls, model: PreTrainedModel, sites: SiteOverride | None = None):
        """Wrap ``model`` (any ``AutoModelForCausalLM`` instance) with nothing attached yet.

        Args:
            model: the base model; it is not modified and remains usable as the plain model.
            sites: optional override of the FFL sites (see :func:`unlearn_hf.sites.find_ffl_sites`).
        """
        if isinstance(model, UnlearnedModelForCausalLM):
            raise TypeError(
                "This model is already an UnlearnedModelForCausalLM; attach more methods to it directly."
            )
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"Expected a transformers PreTrainedModel (a causal LM), got {type(model).__name__}."
            )
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
        obj._unlearn_sites = None
        obj._unlearn_methods = {}
        obj._unlearn_hooks = {}
        return obj

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

    # -- the base model --------------------------------------------------------------------------------------
    @property
    def base_model(self) -> PreTrainedModel:
        """The plain base model (same modules; unlearning never applies when it is called)."""
        return self._unlearn_base

    def get_base_model(self) -> PreTrainedModel:
        return self._unlearn_base

    @property
    def ffl_sites(self) -> list[FFLSite]:
        """The validated FFL sites of every decoder layer (found once, lazily)."""
        if self._unlearn_sites is None:
            self._unlearn_sites = find_ffl_sites(self._unlearn_base, self._unlearn_site_override)
        return self._unlearn_sites

    # -- methods ---------------------------------------------------------------------------------------------
    @property
    def methods(self) -> Mapping[str, UnlearningMethod]:
        """Attached methods by name (read-only view)."""
        return MappingProxyType(self._unlearn_methods)

    @property
    def has_abstention(self) -> bool:
        """Whether an attached method can make the model abstain."""
        return any(m.abstains for m in self._unlearn_methods.values())

    def fit(
        self,
        config: MethodConfig,
        forget: Any,
        retain: Any = None,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        batch_size: int = 8,
        max_length: int = 512,
        text_column: str = "text",
        prompt_column: str | None = None,
        completion_column: str | None = None,
        show_progress: bool = True,
    ) -> UnlearningMethod:
        """Fit a method on forget (and retain) data, attach it under ``name`` and return it.

        Args:
            config: a method config (``NeuronAdjustConfig``, ``KeySpaceDetectionConfig``, ...).
            forget / retain: strings, dicts, a ``datasets.Dataset`` or tokenized batches.
            tokenizer: the model's tokenizer (for text data; also refusal texts).
            name: name of the attached method (default: the method type).
            batch_size / max_length / *_column: how data is read (see :class:`unlearn_hf.data.DataSpec`).
            show_progress: tqdm progress bars.
        """
        if not isinstance(config, MethodConfig):
            raise TypeError(f"config must be a method config, got {type(config).__name__}.")
        if config.method_type not in self.method_classes:
            raise ValueError(
                f"No implementation for method {config.method_type!r}; known: {sorted(self.method_classes)}."
            )
        name = name or config.method_type
        if name in self._unlearn_methods:
            raise ValueError(
                f"A method named {name!r} is already attached; remove it first or pick another name."
            )
        spec = DataSpec(text_column, prompt_column, completion_column, batch_size, max_length)
        method = self.method_classes[config.method_type].fit(
            self, config, forget, retain, tokenizer, spec=spec, show_progress=show_progress
        )
        self.add_method(name, method)
        return method

    def add_method(self, name: str, method: UnlearningMethod) -> None:
        """Attach a fitted method. Either every hook is registered or none is."""
        if name in self._unlearn_methods:
            raise ValueError(f"A method named {name!r} is already attached.")
        if not isinstance(method, UnlearningMethod):
            raise TypeError(f"Expected a fitted UnlearningMethod, got {type(method).__name__}.")
        registrar = HookRegistrar(self, name)
        try:
            method.attach(self, registrar)
        except BaseException:
            registrar.remove()
            raise
        self._unlearn_methods[name] = method
        self._unlearn_hooks[name] = registrar

    def remove_method(self, name: str) -> UnlearningMethod:
        """Detach a method (removing only its own hooks) and return it."""
        if name not in self._unlearn_methods:
            raise KeyError(f"No method named {name!r}; attached: {sorted(self._unlearn_methods)}.")
        self._unlearn_hooks.pop(name).remove()
        return self._unlearn_methods.pop(name)

    def remove_all_methods(self) -> None:
        """Detach every method: the model is then exactly the base model again."""
        for name in list(self._unlearn_methods):
            self.remove_method(name)

    def unload(self) -> PreTrainedModel:
        """Detach every method and return the plain base model."""
        self.remove_all_methods()
        return self._unlearn_base

    @contextlib.contextmanager
    def disable_unlearning(self, *names: str) -> Iterator[None]:
        """Within the block (in this thread/task), the model is the plain base model; with ``names``, only those
        methods are switched off."""
        unknown = [n for n in names if n not in self._unlearn_methods]
        if unknown:
            raise KeyError(f"No methods named {unknown}; attached: {sorted(self._unlearn_methods)}.")
        outer = _DISABLED.get()
        previous = outer[1] if outer is not None and outer[0] is self else frozenset()
        now = None if (not names or previous is None) else previous | frozenset(names)
        token = _DISABLED.set((self, now))
        try:
            yield
        finally:
            _DISABLED.reset(token)

    def disable_abstention(self) -> contextlib.AbstractContextManager[None]:
        """Switch off the abstaining methods only (e.g. to score text whose abstention was decided apart)."""
        names = [n for n, m in self._unlearn_methods.items() if m.abstains]
        return self.disable_unlearning(*names) if names else contextlib.nullcontext()

    def _disabled_names(self) -> frozenset[str] | None:
        """Methods switched off in this context; ``None`` when all are."""
        state = _DISABLED.get()
        if state is None or state[0] is not self:
            return frozenset()
        return state[1]

    # -- calling ---------------------------------------------------------------------------------------------
    def _bind_forward(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The forward's arguments by name (keyword-only calls, as ``generate`` makes, need no binding)."""
        if not args:
            return kwargs
        base_cls = type(self)._unlearn_base_class
        sig = self._forward_signatures.get(base_cls)
        if sig is None:
            sig = self._forward_signatures[base_cls] = inspect.signature(base_cls.forward)
        return sig.bind_partial(None, *args, **kwargs).arguments

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base_cls = cls.__dict__.get("_unlearn_base_class")
        wrapper_mro = [c for c in cls.__mro__[1:] if issubclass(c, UnlearnedModelForCausalLM)]
        if base_cls is not None and not any("forward" in c.__dict__ for c in wrapper_mro):
            cls.forward = _forward_passthrough(base_cls)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._unlearned_call(super().__call__, args, kwargs)

    def _unlearned_call(self, call: Any, args: tuple, kwargs: dict) -> Any:
        """Run ``call(*args, **kwargs)`` (the base ``__call__`` or ``forward``) with the attached methods active.

        Each call is one forward of a request (see :meth:`_forward_context`); methods see it through
        ``on_forward_start``/``on_forward_end`` and their hooks. Outside ``generate``, the request rides on the
        returned KV cache, so a hand-written decoding loop that passes the cache back continues it.
        """
        disabled = self._disabled_names()
        active = (
            []
            if disabled is None
            else [(n, m) for n, m in self._unlearn_methods.items() if n not in disabled]
        )
        if not active:
            return call(*args, **kwargs)
        ctx = self._forward_context(self._bind_forward(args, kwargs), disabled)
        token = _CURRENT.set(ctx)
        try:
            for _, method in active:
                method.on_forward_start(ctx)
            output = call(*args, **kwargs)
            for _, method in active:
                output = method.on_forward_end(ctx, output)
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

    def _active_abstaining(self) -> list[tuple[str, UnlearningMethod]]:
        """The attached abstaining methods that are not switched off in this context."""
        disabled = self._disabled_names()
        if disabled is None:
            return []
        return [(n, m) for n, m in self._unlearn_methods.items() if m.abstains and n not in disabled]

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``transformers`` ``generate`` with the attached methods active.

        Every call is one request: abstaining methods decide per row at the prefill, and their logits processor
        (if they have one, see :meth:`_prepare_generate`) runs after every other processor, so sampling settings,
        ``min_new_tokens``, repetition penalties and the like cannot alter an abstaining row's refusal. With an
        abstaining method and ``return_dict_in_generate=True``, the output has ``abstained``: a bool tensor with
        one entry per returned sequence.
        """
        request = RequestState(self)
        bound = self._bind_generate(args, kwargs)
        abstaining = self._active_abstaining()
        if abstaining:
            self._prepare_generate(request, bound, abstaining)
        token = _GENERATION.set(request)
        try:
            output = super().generate(*bound.args, **bound.kwargs)
        finally:
            _GENERATION.reset(token)
        if isinstance(output, ModelOutput) and self.has_abstention:
            n_inputs = self._count_inputs(bound)
            output["abstained"] = self.abstained_rows(request, n_inputs, output.sequences.shape[0])
        return output

    def _bind_generate(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        base_cls = type(self)._unlearn_base_class
        key = (base_cls, "generate")
        sig = self._forward_signatures.get(key)
        if sig is None:
            sig = self._forward_signatures[key] = inspect.signature(base_cls.generate)
        bound = sig.bind_partial(self, *args, **kwargs)
        del bound.arguments[next(iter(sig.parameters))]  # self
        return bound

    @staticmethod
    def _generate_inputs(bound: inspect.BoundArguments) -> tuple[torch.Tensor | None, dict[str, Any]]:
        extra = bound.arguments.get("kwargs", {})
        ids = bound.arguments.get("inputs")
        if not torch.is_tensor(ids):
            ids = extra.get("input_ids", extra.get("inputs_embeds"))
        return (ids if torch.is_tensor(ids) else None), extra

    def _prepare_generate(
        self,
        request: RequestState,
        bound: inspect.BoundArguments,
        abstaining: list[tuple[str, UnlearningMethod]],
    ) -> None:
        """Tell the request what ``generate`` will do (prompt length, end-of-sequence token, beam groups) and add
        the abstaining methods' logits processors at the end of the processor list."""
        from transformers import LogitsProcessorList

        ids, extra = self._generate_inputs(bound)
        config = bound.arguments.get("generation_config") or self.generation_config
        mask = extra.get("attention_mask")
        if torch.is_tensor(mask) and mask.ndim == 2:
            request.prompt_len = mask.shape[1]
        elif ids is not None and ids.ndim >= 2:
            request.prompt_len = ids.shape[1]
        eos = extra.get("eos_token_id", getattr(config, "eos_token_id", None))
        if torch.is_tensor(eos):
            eos = eos.flatten().tolist()
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        request.eos_token_id = None if eos is None else int(eos)
        request.group_size = max(1, int(extra.get("num_beams", getattr(config, "num_beams", 1)) or 1))
        processors = [
            p
            for _, m in abstaining
            if (make := getattr(m, "logits_processor", None)) is not None and (p := make(request)) is not None
        ]
        if processors:
            user = bound.arguments.get("logits_processor")
            bound.arguments["logits_processor"] = LogitsProcessorList([*(user or []), *processors])

    def _count_inputs(self, bound: inspect.BoundArguments) -> int:
        ids, _ = self._generate_inputs(bound)
        return 1 if ids is None or ids.ndim < 2 else ids.shape[0]

    def abstained_rows(self, request: RequestState, n_inputs: int, n_returned: int) -> torch.Tensor:
        """Per returned row, whether it abstained.

        Rows map one to one when ``generate`` returns as many rows as it ran (greedy, sampling, also with
        ``num_return_sequences``); with beam search the rows of one input share the input's decision.
        """
        flags = self.combine_abstention(
            {n: request.data[n] for n, m in self._unlearn_methods.items() if m.abstains and n in request.data}
        )
        if flags is None:
            return torch.zeros(n_returned, dtype=torch.bool)
        flags = flags.cpu()
        if flags.numel() == n_returned:
            return flags
        if flags.numel() % n_inputs or n_returned % n_inputs:
            raise RuntimeError(
                f"Cannot map {flags.numel()} abstention flags onto {n_returned} returned rows of {n_inputs} inputs."
            )
        per_input = flags.view(n_inputs, -1).any(1)
        return per_input.repeat_interleave(n_returned // n_inputs)

    def combine_abstention(self, states: dict[str, Any]) -> torch.Tensor | None:
        """Combine the per-row abstention flags of several abstaining methods (default: any abstains)."""
        flags = [s.abstained for s in states.values() if getattr(s, "abstained", None) is not None]
        if not flags:
            return None
        out = flags[0].clone()
        for f in flags[1:]:
            out |= f.to(out.device)
        return out

    @torch.no_grad()
    def detect(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Which rows the attached abstaining methods would refuse (bool ``[batch]``), from one forward pass.

        The decision is the one ``generate`` takes at the prefill (last real token of each row, either padding
        side). The forward stops as soon as every abstaining method has decided (e.g. after the last layer Key
        Space Detection reads), so this is cheaper than a full forward.
        """
        if not self.has_abstention:
            raise RuntimeError("No abstaining method (e.g. Key Space Detection) is attached.")
        if not torch.is_tensor(input_ids) or input_ids.ndim != 2:
            raise ValueError("input_ids must be a [batch, length] tensor of token ids.")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}."
            )
        abstaining = self._active_abstaining()
        device = self.get_input_embeddings().weight.device
        inputs = {"input_ids": input_ids.to(device), "use_cache": False}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask.to(device)
            if "position_ids" in self._forward_parameters():  # as generate does: the same decision
                inputs["position_ids"] = position_ids_from_mask(attention_mask).to(device)
        if "logits_to_keep" in self._forward_parameters():
            inputs["logits_to_keep"] = 1
        request = RequestState(self, stop_when_decided={n for n, _ in abstaining})
        token = _GENERATION.set(request)
        try:
            if abstaining:
                self(**inputs)
        except StopForward:
            pass
        finally:
            _GENERATION.reset(token)
        flags = self.combine_abstention({n: request.data[n] for n, _ in abstaining if n in request.data})
        return flags.cpu() if flags is not None else torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def _forward_parameters(self) -> set[str]:
        base_cls = type(self)._unlearn_base_class
        sig = self._forward_signatures.get(base_cls)
        if sig is None:
            sig = self._forward_signatures[base_cls] = inspect.signature(base_cls.forward)
        return set(sig.parameters)

    # -- persistence (implemented in unlearn_hf.persistence) -------------------------------------------------
    @classmethod
    def _wrapper_class(cls) -> type[UnlearnedModelForCausalLM]:
        """The user-facing class (``UnlearnedModelForCausalLM`` or a user subclass) behind a dynamic class."""
        return cls.__bases__[0] if "_unlearn_base_class" in cls.__dict__ else cls

    def save_pretrained(self, save_directory, *, save_base_model: bool = False, **kwargs: Any) -> None:
        """Save the attached methods (``unlearn_config.json`` + ``unlearn_model.safetensors``) and, with
        ``save_base_model=True``, the base model's own files in the same folder. See ``FORMAT.md``."""
        from .persistence import save_unlearned

        save_unlearned(self, save_directory, save_base_model=save_base_model, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args: Any, base_model=None, **kwargs: Any):
        """Load an unlearned model from a local folder or a Hub repo id, with the ``transformers`` calling
        convention (``revision``, ``torch_dtype``/``dtype``, ``device_map``, ... go to the base model), or attach
        saved unlearning to ``base_model`` already in memory."""
        from .persistence import load_unlearned

        return load_unlearned(
            cls._wrapper_class(), pretrained_model_name_or_path, *model_args, base_model=base_model, **kwargs
        )

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the unlearning files (and a model card) to the Hub; see :func:`unlearn_hf.persistence.push_unlearned`."""
        from .persistence import push_unlearned

        return push_unlearned(self, repo_id, **kwargs)
