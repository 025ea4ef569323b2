"""The contract every unlearning method implements.

A method comes in two parts:

* the **fitted method** (:class:`UnlearningMethod`): an immutable config plus fitted tensors. It holds nothing
  about any model it is attached to, so one fitted method can be attached to any number of models at once,
  saved, loaded and compared;
* its **attachment** (:class:`Attachment`): what one model needs to run the method (per-layer tensors on each
  layer's device, the hooks, per-request scratch space), created by :meth:`UnlearningMethod.attach` and owned by
  that model until it is detached.

Abstaining methods (the model refuses instead of answering) implement :class:`AbstainingMethod`, whose
attachments are :class:`AbstainingAttachment`: a per-row decision per request, the logits processor that
forces the refusal in ``generate``, and the report of which rows abstained.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from ..context import ForwardContext, RequestState
from ..data import DataSpec
from ..hooks import HookRegistrar
from .config import MethodConfig


class Attachment:
    """What one fitted method holds for one model it is attached to.

    Args:
        method: the fitted method.
        model: the unlearned model it is attached to.
        name: the name it is attached under (keys its per-request data in :attr:`RequestState.data`).
        hooks: the registrar of its hooks (removed by :meth:`detach`).
    """

    def __init__(self, method: UnlearningMethod, model: Any, name: str, hooks: HookRegistrar) -> None:
        self.method = method
        self.model = model
        self.name = name
        self.hooks = hooks

    def on_forward_start(self, ctx: ForwardContext) -> None:  # noqa: B027 - optional hook
        """Called before every forward of the model (not when this method is disabled)."""

    def on_forward_end(self, ctx: ForwardContext, output: Any) -> Any:
        """Called after every forward; may modify and return ``output``."""
        return output

    def request_data(self, request: RequestState, factory: Any = None) -> Any:
        """This attachment's scratch space in ``request`` (created with ``factory()`` when missing and given)."""
        data = request.data.get(self.name)
        if data is None and factory is not None:
            data = request.data[self.name] = factory()
        return data

    def detach(self) -> None:
        """Remove this attachment's hooks (and only them)."""
        self.hooks.remove()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {type(self.method).__name__})"


class AbstainingAttachment(Attachment, ABC):
    """The attachment of an abstaining method: the contract the model relies on to abstain.

    * **decision** -- :meth:`decision`: the per-row decision of a request, taken during its prefill by the
      method's hooks (see the method's ``decision.py``);
    * **processor** -- :meth:`logits_processor`: run by ``generate`` after every other logits processor, so no
      sampling setting can alter a refusal;
    * **report** -- :meth:`decision` is what ``generate(..., return_dict_in_generate=True)`` reports per returned
      row (``abstained``, and per method in ``abstained_by``) and what :meth:`detect` returns;
    * **modes** -- :meth:`check_request`: refuse, before ``generate`` runs, a decoding mode the method cannot
      abstain correctly in (``generate`` itself refuses the modes no abstaining method can be checked in).
    """

    @abstractmethod
    def decision(self, request: RequestState) -> torch.Tensor | None:
        """Bool ``[rows]`` (CPU): which rows of ``request`` abstain; ``None`` before the decision was taken."""

    @abstractmethod
    def logits_processor(self, request: RequestState) -> Any:
        """A ``transformers`` ``LogitsProcessor`` forcing the refusal of the abstaining rows of ``request``
        (``None`` when the method forces nothing through ``generate``'s processors)."""

    def check_request(self, request: RequestState) -> None:  # noqa: B027 - optional check
        """Raise (``ValueError``) before ``generate`` runs when this method cannot abstain correctly in the decoding
        ``request`` describes (e.g. ``request.speculative``: assisted decoding). Default: every mode is fine."""


class UnlearningMethod(ABC):
    """A fitted unlearning method: its config (plain values) plus its fitted tensors, attachable to models.

    Subclasses set :attr:`config_class`, :attr:`short_name` and :attr:`label`, implement :meth:`fit`,
    :meth:`state_spec` and :meth:`attach`, and register with :func:`unlearn_hf.methods.registry.register_method`.
    The fitted state is read-only: attaching never changes it.
    """

    config_class: ClassVar[type[MethodConfig]]
    #: The name on the command line (``--method na``).
    short_name: ClassVar[str] = ""
    #: The name in reports, the demo table and model cards.
    label: ClassVar[str] = ""
    #: What the method does and where it stops, in one or two sentences (shown on model cards).
    summary: ClassVar[str] = ""
    #: Whether :meth:`fit` needs retain data.
    needs_retain: ClassVar[bool] = True
    #: What the forget data is, for the CLI and demo: ``"texts"`` (question + answer) or ``"queries"``
    #: (questions only).
    fit_on: ClassVar[str] = "texts"
    #: Config fields the command line sets (``--ratio``, ``--alpha``, ...) for this method.
    cli_options: ClassVar[tuple[str, ...]] = ()
    #: The per-dimension statistics its probes keep (``probe(..., statistics=...)``; each costs a pass over the
    #: activations), so that a pass shared with other methods (``fit`` of a list) keeps what they all read.
    statistics: ClassVar[tuple[str, ...]] = ("moments", "abs")

    def __init__(self, config: MethodConfig, state: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}."
            )
        state = dict(state)
        self.validate_state(state, config)
        self._config = config
        self._state = state
        #: Digests of the activation-changing methods the model ran with while this method was fitted (``None``:
        #: unknown, e.g. built by hand or loaded from an older save); see :mod:`unlearn_hf.fit_context`.
        self.fitted_with: tuple[str, ...] | None = None

    @property
    def config(self) -> MethodConfig:
        """The method's config (frozen)."""
        return self._config

    @property
    def state(self) -> Mapping[str, torch.Tensor]:
        """The fitted tensors by name (a read-only mapping)."""
        return MappingProxyType(self._state)

    @property
    def method_type(self) -> str:
        return self.config.method_type

    @property
    def stochastic(self) -> bool:
        """Whether the attached method's output depends on random draws (and so on the batch's shape and seed)."""
        return False

    @property
    def abstains(self) -> bool:
        """Whether the method makes the model abstain (refuse) rather than change activations."""
        return isinstance(self, AbstainingMethod)

    # -- fitting ---------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def fit(
        cls,
        model: Any,
        config: MethodConfig,
        forget: Any,
        retain: Any = None,
        tokenizer: Any = None,
        *,
        spec: DataSpec,
        show_progress: bool = True,
    ) -> UnlearningMethod:
        """Probe ``forget`` (and ``retain``) on ``model`` as it runs and return the fitted method."""

    @classmethod
    def probe_sites(cls, config: MethodConfig, n_layers: int) -> dict[str, list[int]]:
        """The sites its fit probes, ``{"pre" | "key": layers}``, on a model of ``n_layers`` FFL layers (for
        sharing probe passes in ``fit`` of a list; ``{}``: nothing to share)."""
        return {}

    @classmethod
    def changed_sites(cls, config: MethodConfig, n_layers: int) -> dict[str, list[int]] | None:
        """The sites whose activations the attached method changes (``{}``: none; ``None``: unknown, every site
        is assumed changed). A later fit's probe may reuse an earlier pass only where this method changes none
        of the sites it reads."""
        return None

    # -- state -----------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def state_spec(
        cls, config: MethodConfig, state: dict[str, torch.Tensor]
    ) -> dict[str, tuple[tuple, torch.dtype]]:
        """Expected ``{name: (shape, dtype)}`` of the fitted tensors (shapes may depend on ``state``)."""

    @classmethod
    def validate_state(cls, state: Mapping[str, torch.Tensor], config: MethodConfig | None = None) -> None:
        """Raise ``ValueError`` naming the problem if a tensor is missing, misshapen, of wrong dtype or not finite."""
        spec = cls.state_spec(config, state) if config is not None else None
        if spec is None:
            return
        missing = sorted(set(spec) - set(state))
        if missing:
            raise ValueError(f"Fitted state is missing tensors: {missing}.")
        for name, (shape, dtype) in spec.items():
            t = state[name]
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"Tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}.")
            if t.dtype != dtype:
                raise ValueError(f"Tensor {name!r} has dtype {t.dtype}, expected {dtype}.")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"Tensor {name!r} holds NaN or inf values.")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fitted tensors (CPU), as saved in ``unlearn_model.safetensors``."""
        return {k: v.detach().cpu().contiguous() for k, v in self._state.items()}

    # -- applying --------------------------------------------------------------------------------------------
    @abstractmethod
    def attach(self, model: Any, hooks: HookRegistrar) -> Attachment:
        """Prepare what ``model`` needs (per-layer tensors on each layer's device and dtype), register hooks
        through ``hooks`` and return the attachment. Must not change ``self``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class AbstainingMethod(UnlearningMethod):
    """A method that makes the model abstain: its :meth:`attach` returns an :class:`AbstainingAttachment`."""

    needs_retain: ClassVar[bool] = False
    fit_on: ClassVar[str] = "queries"

    @abstractmethod
    def attach(self, model: Any, hooks: HookRegistrar) -> AbstainingAttachment: ...
