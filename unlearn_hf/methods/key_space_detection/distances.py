"""The calibration pass: scaled distances of the trailing key vectors of rendered queries to every candidate
key unit (:mod:`.key_units`), in one forward per batch (all units at once, stopping once all are read)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ...batch_plan import PaddingMeter
from ...data import DataSpec
from ...distributed import is_main_process, sum_sharded
from ...hooks import PassHooks
from ...model_inputs import StopForward, accepts, input_device, position_ids_from_mask
from ...sites import FFLSite, as_token_grid
from .hypercube import KeySpaceLayer
from .key_units import RoutedUnit, wanted_tokens
from .rendering import RenderedQuery

logger = logging.getLogger(__name__)


def warn_long(rows: Sequence[Sequence[int]], max_length: int, what: str) -> None:
    """Warn how many of ``rows`` are longer than ``max_length`` tokens: :func:`pad_left` keeps only their end, so
    their keys are read with less context than the model has at generate time."""
    long = sum(len(r) > max_length for r in rows)
    if long:
        logger.warning(
            "%d of %d %s are longer than max_length=%d tokens: only their end is read (pass max_length=... to "
            "read more).",
            long,
            len(rows),
            what,
            max_length,
        )


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
    cubes: dict[int, KeySpaceLayer | RoutedUnit],
    *,
    window: int,
    pad_id: int,
    spec: DataSpec,
    show_progress: bool = True,
    desc: str = "calibrating",
) -> torch.Tensor:
    """``z`` ``[len(queries), len(cubes), window]`` (float64): at each key unit of ``cubes`` (``{unit id: reader}``
    from :func:`~.key_units.unit_readers`; in sorted id order) and each of
    the query's last ``window`` positions (offset 0 = the last token), the scaled distance ``max_d |v_d − μ_d| /
    σ_d / k`` (:mod:`.key_units` for routed units); ``inf`` where the prompt is shorter than the window. The
    queries run in the token-budget batches of ``spec`` (each truncated on the left to ``spec.max_length``); in a
    distributed fit each rank runs its share of the batches and the rows are summed over the ranks
    (:func:`~unlearn_hf.distributed.sum_sharded`: zeros where another rank's rows are), the same on every rank."""
    return sum_sharded(
        lambda mine: _distances(
            model, queries, sites, cubes, mine, window, pad_id, spec, show_progress, desc
        ),
        "Key Space Detection calibration",
    )


def _distances(model, queries, sites, cubes, mine, window, pad_id, spec, show_progress, desc) -> torch.Tensor:
    """:func:`trailing_distances` of the batches ``i`` with ``mine(i)`` (zeros in the other rows)."""
    unit_ids = sorted(cubes)
    by_layer = {s.layer: s for s in sites}
    out = torch.zeros((len(queries), len(unit_ids), window), dtype=torch.float64)
    captured: dict[int, torch.Tensor] = {}
    length = [0]  # the current batch's sequence length (OPT runs its FFL on [batch * positions, d_ff])

    def captured_(unit: int, value: torch.Tensor) -> None:
        captured[unit] = value
        if len(captured) == len(unit_ids):  # every unit read: the rest of the forward is not needed
            raise StopForward

    def dense_hook(unit: int):
        return lambda module, args: captured_(
            unit, as_token_grid(args[0], length[0])[:, -window:, :].detach()
        )

    def routed_hooks(unit: int, reader: RoutedUnit):
        current = {}

        def start(module, args):
            tokens = reader.tokens(args)
            rows, seq = tokens // length[0], length[0]
            index = torch.arange(max(0, seq - window), seq, device=args[0].device).expand(rows, -1)
            valid = torch.ones_like(index, dtype=torch.bool)
            current[unit] = reader.start(tokens, wanted_tokens(rows, seq, index, valid), args[0].device)

        def tap(expert: int):
            def hook(module, args):
                current[unit].add(expert, args[0], args[1])

            hook.unlearn_observer = (
                True  # it only reads: the experts module runs its own forward, as at run time
            )
            return hook

        def end(module, args, output):
            captured_(unit, current.pop(unit).distances().view(-1, length[0])[:, -window:])

        hooks.pre(reader.owner, start)
        for s in reader.read_sites:
            hooks.pre(s.key, tap(s.expert))
        hooks.post(reader.owner, end)

    device = input_device(model)
    positions = accepts(model, "position_ids")
    meter = PaddingMeter()
    warn_long([q.input_ids for q in queries], spec.max_length, f"queries of the {desc} pass")
    plan = spec.plan([min(len(q.input_ids), spec.max_length) for q in queries], device)
    own = sum(len(batch) for b, batch in enumerate(plan) if mine(b))
    bar = tqdm(total=own, desc=desc, disable=not show_progress or not is_main_process(), unit="q")
    hooks = PassHooks()  # only this pass's forwards run them, not another thread's through the same modules
    try:
        for unit, cube in cubes.items():
            if isinstance(cube, RoutedUnit):
                routed_hooks(unit, cube)
            else:
                hooks.pre(by_layer[unit].key, dense_hook(unit))
        for b, batch in enumerate(plan):
            if not mine(b):
                continue
            rows = torch.tensor(batch)
            out[rows] = torch.inf
            ids, mask = pad_left([queries[i].input_ids for i in batch], pad_id, spec.max_length)
            meter.add(mask)
            length[0] = ids.shape[1]
            kw = {"position_ids": position_ids_from_mask(mask).to(device)} if positions else {}
            captured.clear()
            try:
                with hooks.running():
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kw)
            except StopForward:
                pass
            real = mask[:, -window:].flip(1).bool()  # [B, w], offset 0 first
            w = real.shape[1]
            for j, unit in enumerate(unit_ids):
                cube = cubes[unit]
                # [B, w] (the keys' last window positions), offset 0 first
                routed = isinstance(cube, RoutedUnit)
                z = captured[unit] if routed else cube.scaled(captured[unit])
                z = torch.where(real, z.to(torch.float64).cpu().flip(1), torch.inf)
                # a routed unit marks a token no expert with a hypercube saw with inf: there only NaN is broken
                broken = (z.isnan() if routed else (~z.isfinite() & real)).any(1)
                if broken.any():
                    raise ValueError(
                        f"{desc}: the model produced NaN or inf key vectors at layer {unit} for {int(broken.sum())} of "
                        f"{len(batch)} queries; they cannot be placed. Usual causes: float16 overflow (use bfloat16 or "
                        "float32), or an attention implementation that gives padded rows NaN (try "
                        "attn_implementation='sdpa')."
                    )
                out[rows, j, :w] = z
            bar.update(len(batch))
        meter.log(desc)
    finally:
        bar.close()
        hooks.remove()
    return out
