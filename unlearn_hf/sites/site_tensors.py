"""The tensors at a site: their ``[batch, seq, d_ff]`` view (OPT flattens the tokens) and the device they live on."""

from __future__ import annotations

import torch
from torch import nn

from .ffl_site import SiteError


def as_token_grid(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """View a site tensor as ``[batch, seq_len, d]``.

    Site tensors are ``[batch, seq, d]`` except in OPT, which runs its FFL on ``[batch * seq, d]``.

    Raises:
        SiteError: when ``x`` is neither layout.
    """
    if x.dim() == 3 and x.shape[1] == seq_len:
        return x
    if x.dim() == 2 and seq_len > 0 and x.shape[0] % seq_len == 0:
        return x.view(x.shape[0] // seq_len, seq_len, x.shape[1])
    raise SiteError(
        f"A site tensor of shape {tuple(x.shape)} is neither [batch, {seq_len}, d] nor [batch * {seq_len}, d]."
    )


def module_device(module: nn.Module) -> torch.device:
    """The device a module computes on (accelerate's execution device for offloaded modules)."""
    owner = getattr(module, "owner", None)  # an expert's tap computes where its experts module does
    if isinstance(owner, nn.Module):
        return module_device(owner)
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return device if isinstance(device, torch.device) else torch.device(device)
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    raise SiteError(f"Cannot tell the device of {type(module).__name__}: it has no parameters.")
