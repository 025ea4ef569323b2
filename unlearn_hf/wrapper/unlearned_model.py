"""``UnlearnedModelForCausalLM``: a causal LM with unlearning methods attached through hooks."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

from transformers import PreTrainedModel

from ..adapters import check_no_adapters
from ..context import _DISABLED, disabled_for
from ..data import DataSpec
from ..fit_context import check_fit_context, checks_paused
from ..hooks import HookRegistrar
from ..methods.base import Attachment, UnlearningMethod
from ..methods.config import MethodConfig
from ..methods.fit_many import fit_configs
from ..methods.registry import METHOD_CLASSES
from ..model_inputs import learned_position_limit
from ..persistence.fingerprint import compare_parameters, parameter_records
from ..sites import FFLSite, find_ffl_sites
from .abstention import AbstentionMixin
from .calling import CallingMixin
from .copying import CopyingMixin
from .io import PersistenceMixin
from .runtime_class import RuntimeClassMixin


def _sites_in_place(model: PreTrainedModel, sites: list[FFLSite]) -> bool:
    """Whether every site's modules (an expert's: its experts module, which calls its taps) are still in ``model``:
    a module replaced since (surgery, a wrapper of one's own) is not."""
    present = {id(m) for m in model.modules()}
    for site in sites:
        for module in (site.pre, site.key):
            if module is not None and id(module.owner if site.routed else module) not in present:
                return False
    return True


#: Modules whose reads of ``base_model`` mean transformers' backbone (``PreTrainedModel.base_model``).
_LIBRARY_CALLERS = ("transformers", "accelerate", "peft", "torch")

logger = logging.getLogger(__name__)


class UnlearnedModelForCausalLM(
    RuntimeClassMixin, CallingMixin, AbstentionMixin, PersistenceMixin, CopyingMixin
):
    """A causal LM whose skills can be unlearned by attached methods (Neuron Adjust, Key Space Detection,
    Selective Pruning), without changing a single weight.

    **Mechanism.** :meth:`from_base` returns an object of a class created on the fly that subclasses both this
    class and the base model's own class (e.g. ``LlamaForCausalLM``), sharing the base model's modules,
    parameters and config. We chose this over a PEFT-style wrapper because it keeps everything the ecosystem
    checks working unchanged: ``isinstance(m, LlamaForCausalLM)`` and ``isinstance(m, PreTrainedModel)`` hold,
    ``generate`` and ``pipeline("text-generation")`` run their normal code (the class keeps the base class's
    ``__name__``, which pipelines use to accept the model), ``save_pretrained`` writes a config whose
    ``architectures`` loads with plain ``transformers``. The original object is left as it was: it stays the
    plain base model (:meth:`get_base_model`), because every hook we add is gated on the unlearned object being
    the one called, in the current thread or task (see :mod:`unlearn_hf.context`).

    **Methods and attachments.** A fitted method (:attr:`methods`) is immutable and may be attached to several
    models at once; what this model holds for it (per-layer tensors, hooks) is its attachment
    (:attr:`attachments`).

    **Where things are.** The runtime class: :mod:`.runtime_class`; calls and their context (also under
    ``torch.compile`` and activation checkpointing): :mod:`.calling`; abstention in ``generate`` (which decoding
    modes carry it) and :meth:`detect`: :mod:`.abstention`; saving and loading: :mod:`.io`; ``copy.deepcopy``,
    ``copy.copy`` and the refusal to pickle: :mod:`.copying`.

    **Subclassing.** Subclass this class (not the runtime one) and call ``MySubclass.from_base(model)``. Override
    :attr:`method_classes` to swap in your own method implementations (e.g. a ``NeuronAdjust`` subclass with
    another replacement rule), or :meth:`combine_abstention` to change how several abstaining methods vote.
    """

    #: method_type -> implementation used by :meth:`fit` and loading. Override in subclasses.
    method_classes: ClassVar[Mapping[str, type[UnlearningMethod]]] = METHOD_CLASSES

    # -- the base model --------------------------------------------------------------------------------------
    def get_base_model(self) -> PreTrainedModel:
        """The plain base model (same modules; unlearning never applies when it is called)."""
        return self._unlearn_base

    @property
    def base_model(self) -> Any:
        """``transformers``' meaning (the backbone, e.g. ``model.model``) for library code.

        Deprecated for users: up to unlearn_hf 0.2 this returned the plain base model, which user code still gets
        here, with a ``FutureWarning``; use :meth:`get_base_model`. From 0.3 it is transformers' backbone.
        """
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.split(".", 1)[0] in _LIBRARY_CALLERS:
            return PreTrainedModel.base_model.fget(self)
        warnings.warn(
            "UnlearnedModelForCausalLM.base_model returns the plain base model only until unlearn_hf 0.3, where it "
            "becomes transformers' backbone (PreTrainedModel.base_model); use get_base_model() instead.",
            FutureWarning,
            stacklevel=2,
        )
        return self._unlearn_base

    def weights_changed(self) -> list[str]:
        """How the base model's parameters differ from when it was wrapped or loaded (fine-tuned, merged adapters),
        as sentences naming the first few; empty when they are the same (a rounding cast aside). A light
        checkpoint names the base model it was loaded from, so a save reads this (see ``save_pretrained``)."""
        return compare_parameters(
            self._unlearn_wrapped_parameters, parameter_records(self._unlearn_base), exact_upcasts=True
        )

    @property
    def ffl_sites(self) -> list[FFLSite]:
        """The validated FFL sites of every decoder layer (found lazily, and again when one of their modules was
        replaced since: methods fitted or attached after that hook the new modules)."""
        sites = self._unlearn_sites
        if sites is None or not _sites_in_place(self._unlearn_base, sites):
            self._unlearn_sites = find_ffl_sites(self._unlearn_base, self._unlearn_site_override)
        return self._unlearn_sites

    # -- methods ---------------------------------------------------------------------------------------------
    @property
    def methods(self) -> Mapping[str, UnlearningMethod]:
        """Attached fitted methods by name (read-only view)."""
        return MappingProxyType(self._unlearn_methods)

    @property
    def attachments(self) -> Mapping[str, Attachment]:
        """What this model holds for each attached method, by name (read-only view)."""
        return MappingProxyType(self._unlearn_attachments)

    def fit(
        self,
        config: MethodConfig | Sequence[MethodConfig],
        forget: Any,
        retain: Any = None,
        tokenizer: Any = None,
        *,
        name: str | Sequence[str] | None = None,
        independent: bool = False,
        batch_size: int | None = None,
        max_length: int = 512,
        max_batch_tokens: int | None = None,
        text_column: str = "text",
        prompt_column: str | None = None,
        completion_column: str | None = None,
        show_progress: bool = True,
    ) -> UnlearningMethod | list[UnlearningMethod]:
        """Fit a method on forget (and retain) data, attach it under ``name`` and return it.

        The model is probed as it runs, with the methods already attached active.

        Args:
            config: a method config (``NeuronAdjustConfig``, ``KeySpaceDetectionConfig``, ...), or a list of them:
                fitted in order like consecutive calls, sharing probe passes where that changes no result, and
                returned as a list (see :mod:`unlearn_hf.methods.fit_many`); ``name`` is then a list or ``None``.
            independent: with a list, fit every config on the model as it is before the call (none sees the
                others) and share every pass over the same tokens.
            forget / retain: strings, dicts, a ``datasets.Dataset``, tokenized batches or precomputed statistics.
            tokenizer: the model's tokenizer (for text data; also refusal texts).
            name: name of the attached method (default: the method type).
            batch_size / max_length / max_batch_tokens / *_column: how data is read and batched (see
                :class:`unlearn_hf.data.DataSpec`: length-sorted batches of at most ``max_batch_tokens`` padded
                tokens, by default the device's budget, and at most ``batch_size`` examples when given).
            show_progress: tqdm progress bars.

        Raises:
            ValueError: PEFT adapter layers were added to the model (see :mod:`unlearn_hf.adapters`).
        """
        check_no_adapters(self, "fit unlearning methods on this model")
        limit = learned_position_limit(self)
        if limit is not None and max_length > limit:  # a longer row would index past the position table
            logger.warning(
                "max_length=%d is longer than the %d positions of the model's learned position embeddings: rows are "
                "cut to %d tokens.",
                max_length,
                limit,
                limit,
            )
            max_length = limit
        spec = DataSpec(
            text_column, prompt_column, completion_column, batch_size, max_length, max_batch_tokens
        )
        many = isinstance(config, (list, tuple))
        with checks_paused(self):  # each fit records what it ran with; the record is checked once, at the end
            fitted = fit_configs(
                self,
                config if many else [config],
                forget,
                retain,
                tokenizer,
                names=[name] if isinstance(name, str) else name,
                spec=spec,
                show_progress=show_progress,
                independent=independent,
            )
        return fitted if many else fitted[0]

    def add_method(self, name: str, method: UnlearningMethod) -> Attachment:
        """Attach a fitted method under ``name`` and return its attachment. Either every hook is registered or
        none is. The same fitted method may be attached to other models too."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"A method name must be a non-empty string, got {name!r}.")
        if name in self._unlearn_methods:
            raise ValueError(f"A method named {name!r} is already attached.")
        if not isinstance(method, UnlearningMethod):
            raise TypeError(f"Expected a fitted UnlearningMethod, got {type(method).__name__}.")
        registrar = HookRegistrar(self, name)
        try:
            attachment = method.attach(self, registrar)
            if not isinstance(attachment, Attachment):
                raise TypeError(
                    f"{type(method).__name__}.attach returned {type(attachment).__name__}, not an Attachment."
                )
        except BaseException:
            registrar.remove()
            raise
        self._unlearn_methods[name] = method
        self._unlearn_attachments[name] = attachment
        check_fit_context(self)
        return attachment

    def remove_method(self, name: str) -> UnlearningMethod:
        """Detach a method (removing only its own hooks) and return it."""
        if name not in self._unlearn_methods:
            raise KeyError(f"No method named {name!r}; attached: {sorted(self._unlearn_methods)}.")
        self._unlearn_attachments.pop(name).detach()
        method = self._unlearn_methods.pop(name)
        check_fit_context(self)
        return method

    def remove_all_methods(self) -> None:
        """Detach every method: the model is then exactly the base model again."""
        with checks_paused(self):
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
        previous = disabled_for(self)
        now = None if (not names or previous is None) else previous | frozenset(names)
        others = tuple(entry for entry in _DISABLED.get() if entry[0] is not self)
        token = _DISABLED.set((*others, (self, now)))
        try:
            yield
        finally:
            _DISABLED.reset(token)

    def disable_abstention(self) -> contextlib.AbstractContextManager[None]:
        """Switch off the abstaining methods only (e.g. to score text whose abstention was decided apart)."""
        names = [n for n, m in self._unlearn_methods.items() if m.abstains]
        return self.disable_unlearning(*names) if names else contextlib.nullcontext()
