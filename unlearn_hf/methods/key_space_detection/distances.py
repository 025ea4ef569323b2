"""The calibration pass: scaled distances of the trailing key vectors of rendered queries to every candidate
layer's hypercube, in one forward per batch (all layers at once, stopping after the last one needed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ...batch_plan import PaddingMeter
from ...data import DataSpec
from ...model_inputs import StopForward, accepts, input_device, position_ids_from_mask
from ...sites import FFLSite, as_token_grid
from .rendering import RenderedQuery


def pad_left(
    rows: Sequence[Sequence[int]], pad_id: int, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists (keeping each row's last ``max_length`` tokens): ``(input_ids, attention_mask)``."""
    rows = [list(r)[-max_length:] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids, mask


@torch.no_grad()
def trailing_distances(
    model,
    queries: Sequence[RenderedQuery],
    sites: Sequence[FFLSite],
    cubes: dict[int, tuple[torch.Tensor, torch.Tensor, float]],
    *,
    window: int,
    pad_id: int,
    spec: DataSpec,
    show_progress: bool = True,
    desc: str = "calibrating",
) -> torch.Tensor:
    """``z`` ``[len(queries), len(cubes), window]`` (float64): at each layer of ``cubes`` (``{layer: (μ, σ, k)}``,
    in sorted layer order) and each of the query's last ``window`` positions (offset 0 = the last token),
    ``max_d |v_d − μ_d| / σ_d / k``; ``inf`` where the prompt is shorter than the window. The queries run in
    the token-budget batches of ``spec`` (each truncated on the left to ``spec.max_length``)."""
    layer_ids = sorted(cubes)
    by_layer = {s.layer: s for s in sites}
    out = torch.full((len(queries), len(layer_ids), window), torch.inf, dtype=torch.float64)
    captured: dict[int, torch.Tensor] = {}
    last = layer_ids[-1]
    length = [0]  # the current batch's sequence length (OPT runs its FFL on [batch * positions, d_ff])

    def make_hook(layer: int):
        def hook(module, args):
            captured[layer] = as_token_grid(args[0], length[0])[:, -window:, :].detach()
            if layer == last:
                raise StopForward

        return hook

    handles = [by_layer[i].key.register_forward_pre_hook(make_hook(i)) for i in layer_ids]
    device = input_device(model)
    positions = accepts(model, "position_ids")
    bar = tqdm(total=len(queries), desc=desc, disable=not show_progress, unit="q")
    meter = PaddingMeter()
    plan = spec.plan([min(len(q.input_ids), spec.max_length) for q in queries], device)
    try:
        for batch in plan:
            rows = torch.tensor(batch)
            ids, mask = pad_left([queries[i].input_ids for i in batch], pad_id, spec.max_length)
            meter.add(mask)
            length[0] = ids.shape[1]
            kw = {"position_ids": position_ids_from_mask(mask).to(device)} if positions else {}
            captured.clear()
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kw)
            except StopForward:
                pass
            real = mask[:, -window:].flip(1).bool()  # [B, w], offset 0 first
            w = real.shape[1]
            for j, layer in enumerate(layer_ids):
                mu, sigma, k = cubes[layer]
                keys = captured[layer].to(torch.float64).cpu().flip(1)  # [B, w, d], offset 0 first
                z = (keys - mu).abs_().div_(sigma).amax(-1).div_(max(k, 1e-12))
                out[rows, j, :w] = torch.where(real, z, torch.inf)
            bar.update(len(batch))
        meter.log(desc)
    finally:
        bar.close()
        for h in handles:
            h.remove()
    return out
