"""Small facts about a model's inputs that several parts of the library need: where inputs go, which forward
arguments a model accepts, its end-of-sequence token, each row's last real token and its position ids.

A leaf module (it imports nothing from the library), so the probe, the wrapper, the methods and the evaluation
code all share one definition of each.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


class StopForward(Exception):
    """Raised inside a forward whose remaining computation is not needed (the probe's last hook, or an
    abstention decision taken by :meth:`UnlearnedModelForCausalLM.detect`); the caller catches it."""


def forward_parameters(model: Any) -> frozenset[str]:
    """Names of the parameters of ``model``'s forward (of its class's ``forward``, cached per class; ``"**"`` stands
    for a ``**kwargs`` parameter). Empty for an object whose forward has no signature."""
    cls = getattr(type(model), "_unlearn_base_class", type(model))
    params = _FORWARD_PARAMETERS.get(cls)
    if params is None:
        try:
            sig = inspect.signature(cls.forward)
        except (AttributeError, TypeError, ValueError):
            return frozenset()
        names = {
            n if p.kind is not inspect.Parameter.VAR_KEYWORD else "**" for n, p in sig.parameters.items()
        }
        params = _FORWARD_PARAMETERS[cls] = frozenset(names)
    return params


def accepts(model: Any, argument: str, *, through_kwargs: bool = False) -> bool:
    """Whether ``model``'s forward takes ``argument`` by name (e.g. ``position_ids``, ``logits_to_keep``); with
    ``through_kwargs``, a forward with ``**kwargs`` counts as taking it."""
    params = forward_parameters(model)
    return argument in params or (through_kwargs and "**" in params)


def input_device(model: Any) -> torch.device:
    """Where input ids must go: the input embedding's device (also for dispatched models; for offloaded weights,
    accelerate's execution device), else the model's ``device``, else its first parameter's, else the CPU."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    execution = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
    if execution is not None:  # accelerate brings the offloaded weights there for each call
        return execution if isinstance(execution, torch.device) else torch.device(execution)
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def eos_token_id(model: nn.Module, generation_config: Any = None) -> int | None:
    """The end-of-sequence token (the first one when there are several): from ``generation_config`` if given,
    else the model's generation config, else its config; ``None`` when none is set."""
    configs = (generation_config, getattr(model, "generation_config", None), getattr(model, "config", None))
    for cfg in configs:
        eos = getattr(cfg, "eos_token_id", None) if not isinstance(cfg, dict) else cfg.get("eos_token_id")
        if torch.is_tensor(eos):
            eos = eos.flatten().tolist()
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is not None:
            return int(eos)
    return None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, as ``generate`` makes them: left padding must not shift absolute
    position embeddings (GPT-2, OPT...), and a row reads the same whatever its padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_token_index(
    attention_mask: torch.Tensor | None, batch: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, real)``: int64 ``[batch]`` position of each row's last real token (the last position for a row
    without any, or for every row when ``attention_mask`` is ``None``) and bool ``[batch]`` whether the row has
    a real token at all. Works for either padding side."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long), torch.ones(batch, dtype=torch.bool)
    mask = attention_mask.bool()
    real = mask.any(1)
    index = torch.where(real, length - 1 - mask.flip(1).int().argmax(1), length - 1)
    return index, real


def trailing_token_index(
    attention_mask: torch.Tensor | None, batch: int, length: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, valid)``: int64 ``[batch, window]`` positions of each row's last ``window`` real tokens (column 0
    the last one, then backwards) and bool ``[batch, window]`` whether each is a real token of this input (a
    shorter prompt, padding, or a row without real tokens leaves ``False``; ``index`` is then clamped to a valid
    position). Works for either padding side."""
    last, real = last_token_index(attention_mask, batch, length)
    index = last.unsqueeze(1) - torch.arange(window, dtype=torch.long).unsqueeze(0)
    valid = (index >= 0) & real.unsqueeze(1)
    index = index.clamp_min(0)
    if attention_mask is not None:
        valid &= attention_mask.bool().cpu().gather(1, index)
    return index, valid


def last_token_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool mask of the same shape selecting each row's last real token (no position in an all-padding row)."""
    index, real = last_token_index(attention_mask, *attention_mask.shape)
    out = torch.zeros(attention_mask.shape, dtype=torch.bool, device=attention_mask.device)
    rows = real.nonzero().squeeze(1)
    out[rows, index[rows]] = True
    return out


def learned_position_limit(model: nn.Module) -> int | None:
    """How many positions a model with learned position embeddings in its text decoder (GPT-2's ``wpe``, OPT's
    ``embed_positions``, less its offset) can run over: a longer input indexes past the table. ``None`` for the
    others (rotary, ALiBi)."""
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    # the text decoder: the module holding the input embeddings (an image-text model's vision tower has position
    # tables of its own, for its patches)
    owner = next((n.rpartition(".")[0] for n, m in model.named_modules() if m is inputs), "")
    text = model.get_submodule(owner) if inputs is not None else model
    limits = []
    for name, module in text.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if isinstance(module, nn.Embedding) and module is not inputs and ("pos" in leaf or leaf == "wpe"):
            offset = getattr(module, "offset", 0)
            limits.append(module.num_embeddings - (offset if isinstance(offset, int) else 0))
    return min(limits) if limits else None
