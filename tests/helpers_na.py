"""Shared by the Neuron Adjust and Selective Pruning tests: random token batches in two disjoint id ranges (a
"forget" and a "retain" set) and a capture of module inputs/outputs with our own hooks."""

from __future__ import annotations

import torch


def token_batches(seed, lo, hi, n=3, batch=4, width=12, side="right"):
    """Padded batches of random token ids in [lo, hi); each row has 2..width real tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(2, width + 1, (batch,), generator=g)
        ids = torch.randint(lo, hi, (batch, width), generator=g)
        real = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
        if side == "left":
            real = real.flip(1)
        ids[~real] = 2
        out.append({"input_ids": ids, "attention_mask": real.long()})
    return out


FORGET = dict(lo=3, hi=400)
RETAIN = dict(lo=30000, hi=49000)


class Capture:
    """Clones of module outputs (or inputs), in call order, keyed by module name."""

    def __init__(self, model, names, inputs=False):
        self.values: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for name in names:
            mod = model.get_submodule(name)
            if inputs:
                hook = mod.register_forward_pre_hook(lambda m, a, n=name: self._add(n, a[0]))
            else:
                hook = mod.register_forward_hook(lambda m, a, o, n=name: self._add(n, o))
            self.handles.append(hook)

    def _add(self, name, value):
        value = value[0] if isinstance(value, tuple) else value
        self.values.setdefault(name, []).append(value.detach().clone())

    def remove(self):
        for h in self.handles:
            h.remove()
