"""The tensors at a site: their ``[batch, seq, d_ff]`` view (OPT flattens the tokens), the error when one is not that
shape, and the device they live on."""

from __future__ import annotations

import torch
from torch import nn

from .ffl_site import SiteError


def as_token_grid(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """View a site tensor as ``[batch, seq_len, d]``.

    Site tensors are ``[batch, seq, d]`` except in OPT, which runs its FFL on ``[batch * seq, d]``.

    Raises:
        SiteError: when ``x`` is neither layout (for a ``[batch, positions, d]`` tensor, :func:`site_shape_error`'s
            reason).
    """
    if x.dim() == 3 and x.shape[1] == seq_len:
        return x
    if x.dim() == 2 and seq_len > 0 and x.shape[0] % seq_len == 0:
        return x.view(x.shape[0] // seq_len, seq_len, x.shape[1])
    if x.dim() == 3:  # e.g. CPM-Ant's prompt positions of its own: say why
        raise site_shape_error("A site tensor", tuple(x.shape), (x.shape[0], seq_len), x.shape[-1])
    raise SiteError(
        f"A site tensor of shape {tuple(x.shape)} is neither [batch, {seq_len}, d] nor [batch * {seq_len}, d]."
    )


def site_shape_error(name: str, shape: tuple[int, ...], grid: tuple[int, int], d_ff: int) -> SiteError:
    """The error for a dense site tensor of ``shape`` that is not ``[batch, seq, d_ff]`` for a batch of token ids
    shaped ``grid``; ``name`` says which site (``"Layer 0 pre site"``). When only the number of positions differs,
    the message says why the library refuses: the model runs its FFLs over positions that are not the input's
    tokens (CPM-Ant prepends prompt positions of its own), so no row can be told to be a token's."""
    expected = f"expected [batch, seq, {d_ff}]"
    if len(shape) == 3 and shape[0] == grid[0] and shape[2] == d_ff and shape[1] != grid[1]:
        how = (
            "the model adds positions of its own (e.g. CPM-Ant's prompt tokens)"
            if shape[1] > grid[1]
            else "the model drops or merges positions"
        )
        return SiteError(
            f"{name} ran over {shape[1]} positions for {grid[1]} input tokens (shape {shape}, {expected}): {how}, "
            "so the library cannot tell which rows are the input's tokens; unlearn_hf supports models whose "
            "feed-forward layers run over the input's tokens only."
        )
    return SiteError(f"{name} produced shape {shape}, {expected}; the site does not match the model.")


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
    if is_packed_quantized(module):
        kind = type(module)
        raise SiteError(
            f"{kind.__module__}.{kind.__name__} is a quantized module with packed weights, which unlearn_hf cannot "
            f"read (no parameters): {QUANTIZE_AFTER}."
        )
    raise SiteError(f"Cannot tell the device of {type(module).__name__}: it has no parameters.")


#: What to do with a model quantized into packed weights.
QUANTIZE_AFTER = (
    "fit, save or load the unlearning on the float model, then quantize the unlearned model (its hooks carry over; "
    "a light checkpoint saved before quantizing loads onto the float base)"
)


def is_packed_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch.ao's quantized layers, whose weights are packed (not parameters)."""
    return ".quantized" in type(module).__module__
