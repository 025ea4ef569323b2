"""PEFT adapters (LoRA, IA³, ...) and unlearning: the methods are fitted on, and saved against, a model's own weights.

A model whose layers carry unmerged adapters computes something its weights alone do not: statistics fitted on it
describe the adapted model, while a light checkpoint names the base model and its fingerprint reads the base
layers' weights, so it would load onto the plain base without complaint and act on other activations (and a full
save would write PEFT's module names, which the model's class does not load). Models with PEFT's adapter layers,
merged in place or not, are therefore refused where that would happen (wrapping, fitting, a full save), with the
way out: ``merge_and_unload()``, which gives a plain model with the adapted weights. Adapters added on top of an unlearned
model after fitting (fine-tuning it with LoRA) are left alone: the methods act on the base projections' outputs,
before the adapters' deltas, and the unlearning still belongs to the base model's weights.

``peft`` is not a dependency and is never imported here: its objects are recognised by their classes' module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

_MERGE = (
    "merge the adapters into the weights first (model = peft_model.merge_and_unload(), a plain model) and use that "
    "model, saved with save_base_model=True since its weights are no longer the base checkpoint's"
)


def _is_peft_object(obj: Any) -> bool:
    """Whether ``obj``'s class is one of PEFT's (its models, tuner layers and wrappers such as
    ``ModulesToSaveWrapper``, which are not all subclasses of one base)."""
    return type(obj).__module__.split(".")[0] == "peft"


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a PEFT model (``PeftModel``, ``PeftMixedModel``, ...): a PEFT object that wraps a model."""
    return _is_peft_object(model) and callable(getattr(model, "get_base_model", None))


def adapter_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s modules that are PEFT's (adapter layers, wrappers of trained copies)."""
    if not _peft_loaded() or not isinstance(model, nn.Module):
        return []  # peft's classes can only exist once it was imported
    return [name for name, module in model.named_modules() if _is_peft_object(module)]


def plain_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``model``'s named parameters as its plain model has them: the adapters' own parameters (LoRA matrices,
    ``modules_to_save`` copies) are left out, and the weights PEFT wraps keep their plain names
    (``q_proj.base_layer.weight`` is ``q_proj.weight``, ``down_proj.original_module.weight`` is ``down_proj.weight``)."""
    wrappers = (
        {name for name, module in model.named_modules() if _is_peft_object(module)} if _peft_loaded() else ()
    )
    for name, p in model.named_parameters():
        parts, plain = name.split("."), []
        i = 0
        while i < len(parts):
            plain.append(parts[i])
            if ".".join(parts[: i + 1]) in wrappers:
                if parts[i + 1] not in _WRAPPED:
                    break  # the adapter's own parameter
                i += 1  # skip PEFT's wrapping level
            i += 1
        else:
            yield ".".join(plain), p


#: Where PEFT modules keep the module they wrap.
_WRAPPED = ("base_layer", "original_module")


def _peft_loaded() -> bool:
    return "peft" in sys.modules


def check_no_adapters(model: Any, action: str) -> None:
    """Refuse ``model`` for ``action`` (e.g. ``"fit unlearning methods on it"``) when it is a PEFT model or has
    PEFT adapter layers.

    Raises:
        TypeError: ``model`` is a PEFT model.
        ValueError: some of its modules are PEFT's (the message names the first ones).
    """
    if is_peft_model(model):
        if _is_prompt_learning(model):
            raise TypeError(
                f"Cannot {action}: {type(model).__name__} is a PEFT prompt-learning model, whose virtual tokens "
                "cannot be merged into the weights. Unlearning is fitted on a plain model: use "
                "model.get_base_model() (without the learned prompt)."
            )
        raise TypeError(f"Cannot {action}: {type(model).__name__} is a PEFT model; {_MERGE}.")
    layers = adapter_layers(model)
    if layers:
        shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
        raise ValueError(
            f"Cannot {action}: {len(layers)} of its modules are PEFT adapter layers ({shown}), and unlearning "
            f"is fitted on and saved against a model's own weights; {_MERGE}."
        )


def _is_prompt_learning(model: Any) -> bool:
    configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    config = configs.get(active) if isinstance(configs, dict) and isinstance(active, str) else None
    return bool(getattr(config, "is_prompt_learning", False))
