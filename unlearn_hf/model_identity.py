"""What identifies a model's weights: where a parameter's values are held (:func:`held_values`: in the parameter, in
a save's ``state_dict``, or, for a parameter accelerate offloaded to the meta device, in its module's hook), and the
short id that probe statistics carry (:func:`architecture_id`)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from .adapters import plain_parameters


def held_values(
    model: nn.Module, name: str, p: torch.Tensor, weights: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor | None:
    """The values of parameter ``name`` (``p``) of ``model``: ``weights[name]`` when ``weights`` has it (a save's
    ``state_dict``: what the checkpoint holds, not what the model holds in memory; ``None`` when its shape is not
    ``p``'s), else ``p`` itself, or, for a parameter that accelerate offloaded (on the meta device, its values kept
    by its module's hook: ``device_map`` with CPU or disk offload), those; ``None`` when they are nowhere (a model
    built without weights)."""
    if weights is not None and name in weights:
        given = weights[name]
        return given if isinstance(given, torch.Tensor) and given.shape == p.shape else None
    if p.device.type != "meta":
        return p
    prefix, _, local = name.rpartition(".")
    try:
        module = model.get_submodule(prefix) if prefix else model
    except AttributeError:
        return None
    hook = getattr(module, "_hf_hook", None)
    for h in (hook, *getattr(hook, "hooks", ())):
        offloaded = getattr(h, "weights_map", None)
        if offloaded is None:
            continue
        try:
            value = offloaded[local]
        except (KeyError, AttributeError, OSError, RuntimeError):
            continue
        if isinstance(value, torch.Tensor) and value.device.type != "meta" and value.shape == p.shape:
            return value
    return None


def architecture_id(model: nn.Module) -> str:
    """A short id of the model, kept with probe statistics to refuse merging or using statistics of another model:
    its architecture and size, and the first row of each parameter (two checkpoints of one architecture, a base
    model and its fine-tune, differ there), read where it is held (an offloaded parameter from accelerate's hook)
    and rounded to bfloat16, so that the same weights in another dtype or place keep the id. Not the saved
    checkpoint's fingerprint: see :mod:`unlearn_hf.persistence`."""
    config = getattr(model, "config", None)
    parts = [
        str(getattr(config, "model_type", type(model).__name__)),
        str(getattr(config, "vocab_size", "")),
        str(sum(1 for _ in model.parameters())),
        str(sum(p.numel() for p in model.parameters())),
    ]
    digest = hashlib.sha1("|".join(parts).encode())
    for name, p in plain_parameters(model):
        if not p.is_floating_point() or not p.numel() or hasattr(p, "to_local"):
            continue
        values = held_values(model, name, p)
        if values is not None:
            row = values.detach().reshape(-1, p.shape[-1])[0] if p.ndim else values.detach().reshape(1)
            digest.update(row.to("cpu", torch.bfloat16).to(torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]
