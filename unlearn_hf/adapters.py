"""PEFT adapters (LoRA, IA³, ...) and unlearning: the methods are fitted on, and saved against, a model's own weights.

A model whose layers carry unmerged adapters computes something its weights alone do not: statistics fitted on it
describe the adapted model, while a light checkpoint names the base model and its fingerprint reads the base
layers' weights, so it would load onto the plain base without complaint and act on other activations (and a full
save would write PEFT's module names, which the model's class does not load). Models with PEFT's adapter layers,
merged in place or not, are therefore refused where that would happen (wrapping, fitting, a full save), with the
way out: ``merge_and_unload()``, which gives a plain model with the adapted weights. Adapters added on top of an unlearned
model after fitting (fine-tuning it with LoRA) are left alone: the methods act on the base projections' outputs,
before the adapters' deltas, and the unlearning still belongs to the base model's weights.

``peft`` is not a dependency: its layers can only exist once it has been imported, so nothing is imported here.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

_MERGE = (
    "merge the adapters into the weights first (model = peft_model.merge_and_unload(), a plain model) and use that "
    "model, saved with save_base_model=True since its weights are no longer the base checkpoint's"
)


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (or another wrapper of PEFT's)."""
    peft = sys.modules.get("peft")
    peft_model = getattr(peft, "PeftModel", None) if peft is not None else None
    return isinstance(peft_model, type) and isinstance(model, peft_model)


def adapter_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s modules that are PEFT adapter layers (``[]`` when ``peft`` was never imported: none
    can exist)."""
    if "peft" not in sys.modules:
        return []
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # a peft without the module: no layers of this kind to find
        return []
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def check_no_adapters(model: nn.Module, action: str) -> None:
    """Refuse ``model`` for ``action`` (e.g. ``"fit unlearning methods on it"``) when it is a PEFT model or has
    PEFT adapter layers.

    Raises:
        TypeError: ``model`` is a ``PeftModel``.
        ValueError: some of its layers are adapter layers (the message names the first ones).
    """
    if is_peft_model(model):
        raise TypeError(f"Cannot {action}: {type(model).__name__} is a PEFT model; {_MERGE}.")
    layers = adapter_layers(model)
    if layers:
        shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
        raise ValueError(
            f"Cannot {action}: {len(layers)} of its layers are PEFT adapter layers ({shown}), and unlearning "
            f"is fitted on and saved against a model's own weights; {_MERGE}."
        )
