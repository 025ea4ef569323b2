"""The contract every unlearning method implements, and its configuration base class."""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..data import DataSpec
from ..runtime import ForwardContext, HookRegistrar
from ..sites import FFLSite

if TYPE_CHECKING:
    from ..model import UnlearnedModelForCausalLM

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class MethodConfig:
    """Base class of method configurations: plain values only, serialisable to JSON.

    Subclasses set ``method_type`` and validate their fields in ``__post_init__``.
    """

    method_type: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        return {"method_type": self.method_type, **out}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MethodConfig:
        """Build a config from a dict; unknown keys are ignored with a warning (newer writers may add fields)."""
        values = dict(values)
        kind = values.pop("method_type", cls.method_type)
        if kind != cls.method_type:
            raise ValueError(f"Config of method {kind!r} given to {cls.__name__} ({cls.method_type!r}).")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            logger.warning("Ignoring unknown %s config keys: %s", cls.method_type, unknown)
        return cls(**{k: v for k, v in values.items() if k in names})


def check_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}.")


def check_layers(layers, sites: list[FFLSite]) -> list[int]:
    """Resolve a config's ``layers`` (``None`` = all; negative indices count from the end)."""
    n = len(sites)
    if layers is None:
        return list(range(n))
    out = []
    for i in layers:
        if not isinstance(i, int) or not -n <= i < n:
            raise ValueError(f"Layer {i!r} is out of range: this model has {n} FFL layers (0..{n - 1}).")
        out.append(i % n)
    if not out:
        raise ValueError("layers is empty.")
    return sorted(set(out))


class UnlearningMethod(ABC):
    """A fitted unlearning method: its config (plain values) plus its fitted tensors, attachable to a model.

    Subclasses implement :meth:`fit`, :meth:`attach` and describe their tensors in :meth:`state_spec`;
    they may react to whole forward calls through :meth:`on_forward_start` / :meth:`on_forward_end`.
    """

    config_class: ClassVar[type[MethodConfig]]
    #: Whether the method makes the model abstain (refuse) rather than change activations.
    abstains: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, state: dict[str, torch.Tensor]) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}."
            )
        self.config = config
        self.state = dict(state)
        self.validate_state(self.state, config)

    @property
    def method_type(self) -> str:
        return self.config.method_type

    # -- fitting ---------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def fit(
        cls,
        model: UnlearnedModelForCausalLM,
        config: MethodConfig,
        forget: Any,
        retain: Any = None,
        tokenizer: Any = None,
        *,
        spec: DataSpec,
        show_progress: bool = True,
    ) -> UnlearningMethod:
        """Probe ``forget`` (and ``retain``) on the model's base and return the fitted method."""

    # -- state -----------------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def state_spec(
        cls, config: MethodConfig, state: dict[str, torch.Tensor]
    ) -> dict[str, tuple[tuple, torch.dtype]]:
        """Expected ``{name: (shape, dtype)}`` of the fitted tensors (shapes may depend on ``state``)."""

    @classmethod
    def validate_state(cls, state: dict[str, torch.Tensor], config: MethodConfig | None = None) -> None:
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
        return {k: v.detach().cpu().contiguous() for k, v in self.state.items()}

    # -- applying --------------------------------------------------------------------------------------------
    @abstractmethod
    def attach(self, model: UnlearnedModelForCausalLM, hooks: HookRegistrar) -> None:
        """Prepare per-layer tensors on each layer's device/dtype and register hooks through ``hooks``."""

    def on_forward_start(self, ctx: ForwardContext) -> None:  # noqa: B027 - optional hook
        """Called before every forward of the unlearned model (not when this method is disabled)."""

    def on_forward_end(self, ctx: ForwardContext, output: Any) -> Any:
        """Called after every forward; may modify and return ``output``."""
        return output

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


#: method_type -> method class; filled by :func:`register_method`.
METHOD_CLASSES: dict[str, type[UnlearningMethod]] = {}


def register_method(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    """Class decorator registering a method under its config's ``method_type``."""
    METHOD_CLASSES[cls.config_class.method_type] = cls
    return cls


def config_from_dict(values: dict[str, Any]) -> MethodConfig:
    """Build the right config class from a dict with a ``method_type`` key."""
    kind = values.get("method_type")
    if kind not in METHOD_CLASSES:
        raise ValueError(f"Unknown method_type {kind!r}; known: {sorted(METHOD_CLASSES)}.")
    return METHOD_CLASSES[kind].config_class.from_dict(values)
