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
    """A short id of the model, kept with probe statistics to refuse merging or using statistics of another model
    (:func:`same_model`): ``"<architecture>:<dtypes>:<weights>"``, a hash of the model type and size, the floating
    dtypes of its parameters, and a hash of each parameter's first row as it is stored (two checkpoints of one
    architecture, a base model and its fine-tune, differ there); ``-`` for the weights when a parameter is not in
    memory (offloaded by accelerate: it is not read from disk for this). Not the saved checkpoint's fingerprint:
    see :mod:`unlearn_hf.persistence`."""
    config = getattr(model, "config", None)
    parts = [
        str(getattr(config, "model_type", type(model).__name__)),
        str(getattr(config, "vocab_size", "")),
        str(sum(1 for _ in model.parameters())),
        str(sum(p.numel() for p in model.parameters())),
    ]
    architecture = hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]
    floating = [(n, p) for n, p in plain_parameters(model) if p.is_floating_point() and p.numel()]
    dtypes = ",".join(sorted({str(p.dtype).removeprefix("torch.") for _, p in floating}))
    if any(p.is_meta or hasattr(p, "to_local") for _, p in floating):
        return f"{architecture}:{dtypes}:-"
    digest = hashlib.sha1()
    for _, p in floating:
        row = p.detach().reshape(-1, p.shape[-1])[0] if p.ndim else p.detach().reshape(1)
        digest.update(row.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return f"{architecture}:{dtypes}:{digest.hexdigest()[:16]}"


def same_model(a: str, b: str) -> bool:
    """Whether statistics with the ids ``a`` and ``b`` (:func:`architecture_id`; empty: unknown) may come from one
    model: the same architecture, and, when both hold every weight in the same dtypes, the same first rows. Across
    dtypes (a model probed in float32, fitted in bfloat16) or with offloaded weights only the architecture can be
    compared: a rounding of the weights is not told from a change of them."""
    if not a or not b:
        return True
    pa, pb = a.split(":"), b.split(":")
    if len(pa) != 3 or len(pb) != 3:
        return a == b
    if pa[0] != pb[0]:
        return False
    return pa[1] != pb[1] or "-" in (pa[2], pb[2]) or pa[2] == pb[2]
