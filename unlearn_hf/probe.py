"""Streaming probe: per-neuron statistics at the FFL sites without keeping activations (``docs/METHOD.md`` §2)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as _dist
from .batch_plan import PaddingMeter
from .data import DataSpec, TokenBatch, iter_token_batches
from .data_errors import DataError
from .hooks import PassHooks
from .model_identity import architecture_id
from .model_inputs import StopForward, accepts, input_device, position_ids_from_mask
from .probe_share import _SHARE
from .sites import FFLSite, SiteError, as_token_grid, find_ffl_sites, require_pre_sites
from .sites.site_tensors import site_shape_error
from .stats import DEFAULT_STATISTICS, RunningStats, SiteStatistics, check_finite, check_statistics

logger = logging.getLogger(__name__)

SITE_KINDS = ("pre", "key")


@torch.no_grad()
def probe(
    model: nn.Module,
    data: Any,
    tokenizer: Any = None,
    *,
    site: str | Sequence[str] = "pre",
    mode: str = "all",
    layers: Sequence[int] | None = None,
    sites: Sequence[FFLSite] | None = None,
    spec: DataSpec | None = None,
    track_extremes: bool | None = None,
    statistics: Sequence[str] | Mapping[str, Sequence[str]] = DEFAULT_STATISTICS,
    show_progress: bool = True,
    desc: str = "probing",
    distributed: bool | None = None,
    experts_own_forward: bool = False,
) -> SiteStatistics | dict[str, SiteStatistics]:
    """Run ``model`` over ``data`` and return mergeable statistics of the chosen FFL sites.

    Args:
        model: a causal LM; an ``UnlearnedModelForCausalLM`` is probed as it runs, its attached methods active.
        data: strings, dicts, a ``datasets.Dataset`` or an iterable of tokenized batches (see :mod:`unlearn_hf.data`).
        tokenizer: needed for text data.
        site: ``"pre"`` (pre-activation), ``"key"`` (input of the output projection) or both.
        mode: ``"all"``, ``"prompt"``, ``"completion"`` or ``"last"`` (query mode: last real prompt token).
        layers: layer indices to probe (default: all).
        sites: precomputed :class:`FFLSite` list (default: :func:`find_ffl_sites`).
        spec: columns, batch size and truncation length.
        track_extremes: keep per-dimension min/max (default: in query mode).
        statistics: what to accumulate per dimension besides the count: ``"moments"`` (mean and variance) and/or
            ``"abs"`` (mean |x|); each costs a pass over the activations (Neuron Adjust needs the moments,
            Selective Pruning the mean |x|, Key Space Detection the moments and extremes); or ``{kind: [...]}`` per
            site kind (e.g. ``{"pre": ["moments"], "key": ["abs"]}``).
        show_progress: show a tqdm bar (on rank 0 only when distributed).
        experts_own_forward: routed experts run their own forward, their sites computed beside it as Key Space
            Detection reads them at run time (:func:`unlearn_hf.sites.experts.observe_expert_sites`), instead of
            transformers' eager loop (which the probe otherwise runs: it costs less; the two agree to float rounding).
        distributed: shard the data over the processes of the default ``torch.distributed`` process group and
            combine their statistics (every rank gets the same result; see :mod:`unlearn_hf.distributed`).
            ``None`` (default): when a process group is initialized (or as set by
            :func:`unlearn_hf.distributed.distributed_probing`); ``False``: probe all of ``data`` here.

    Returns:
        :class:`SiteStatistics` for a single site kind, or ``{kind: SiteStatistics}`` for several.
    """
    kinds = (site,) if isinstance(site, str) else tuple(site)
    local_kw = dict(
        site=site,
        mode=mode,
        layers=layers,
        sites=sites,
        spec=spec,
        track_extremes=track_extremes,
        statistics=statistics,
        desc=desc,
        experts_own_forward=experts_own_forward,
    )
    if not _dist.resolve_distributed(distributed):
        results = _probe_local(model, data, tokenizer, show_progress=show_progress, **local_kw)[0]
    else:
        rank, world = _dist.get_rank(), _dist.get_world_size()
        local, error, n_batches, fingerprint = None, None, 0, 0
        try:
            local, n_batches, fingerprint = _probe_local(
                model,
                data,
                tokenizer,
                shard=(rank, world),
                show_progress=show_progress and rank == 0,
                **{**local_kw, "desc": f"{desc} [rank {rank}/{world}]"},
            )
        except Exception as err:  # every rank must learn of it, or the others would wait forever
            error = err
        results, total_batches = _dist.exchange_statistics(
            local, error, n_batches=n_batches, data_fingerprint=fingerprint
        )
        if total_batches == 0:
            raise DataError("The data set is empty: the iterable yielded no batches.")
    for k, r in results.items():
        if r.count == 0:
            raise DataError(
                f"No tokens were selected at the {k} site (mode {mode!r}): nothing to learn from."
            )
        check_finite(r, "The model")
    return results[kinds[0]] if isinstance(site, str) else results


def _probe_local(
    model: nn.Module,
    data: Any,
    tokenizer: Any,
    *,
    site: str | Sequence[str],
    mode: str,
    layers: Sequence[int] | None,
    sites: Sequence[FFLSite] | None,
    spec: DataSpec | None,
    track_extremes: bool | None,
    statistics: Sequence[str] | Mapping[str, Sequence[str]],
    show_progress: bool,
    desc: str,
    experts_own_forward: bool = False,
    shard: tuple[int, int] | None = None,
) -> tuple[dict[str, SiteStatistics], int, int]:
    """Probe ``data`` (or this rank's ``shard`` of it) here; returns ``({kind: statistics}, batches probed, the
    whole data's fingerprint)`` (the fingerprint: :func:`~unlearn_hf.sharding.fingerprint_rows` with a ``shard``,
    0 without one or when the data cannot tell it)."""
    kinds = (site,) if isinstance(site, str) else tuple(site)
    if not kinds or any(k not in SITE_KINDS for k in kinds):
        raise ValueError(f"site must be one or more of {SITE_KINDS}, got {site!r}.")
    sites = list(sites) if sites is not None else find_ffl_sites(model)
    by_layer = {s.layer: s for s in sites}
    layer_ids = sorted(by_layer) if layers is None else sorted(set(layers))
    bad = [i for i in layer_ids if i not in by_layer]
    if bad or not layer_ids:
        raise SiteError(
            f"Layers {bad or list(layers or [])} are not FFL layers of this model (0..{len(sites) - 1})."
        )
    if "pre" in kinds:
        require_pre_sites([by_layer[i] for i in layer_ids], "Probing the pre-activation site")
    track = (mode == "last") if track_extremes is None else track_extremes
    if isinstance(statistics, Mapping):
        if set(statistics) != set(kinds):
            raise ValueError(
                f"statistics per site kind must name exactly {list(kinds)}, got {list(statistics)}."
            )
        statistics = {k: check_statistics(statistics[k]) for k in kinds}
    else:
        statistics = dict.fromkeys(kinds, check_statistics(statistics))
    device = input_device(model)
    n_examples, batches = iter_token_batches(
        data, tokenizer, mode=mode, spec=spec, shard=shard, device=device
    )
    stream = batches  # its fingerprint is read after the pass (a stream's is known once it is exhausted)
    pass_kw = dict(
        by_layer=by_layer,
        track=track,
        statistics=statistics,
        mode=mode,
        n_examples=n_examples,
        show_progress=show_progress,
        device=device,
        experts_own_forward=experts_own_forward,
    )
    share = _SHARE.get()
    if share is None or not share.covers(layer_ids, statistics):
        stats, n_batches = _run_pass(model, batches, kinds, layer_ids, desc=desc, **pass_kw)
        return stats, n_batches, getattr(stream, "fingerprint", 0)
    batches = list(batches)
    key = (mode, track, experts_own_forward, _digest(batches))
    if key in share.memo:
        share.hits += 1
        logger.info("%s: the statistics of a shared pass over the same tokens are reused.", desc)
    else:
        all_kinds = tuple(k for k in SITE_KINDS if k in share.sites)
        union = sorted(set().union(*share.sites.values()) & set(by_layer))
        pass_kw["statistics"] = share.statistics  # per kind, what the methods of the share read
        share.memo[key] = _run_pass(model, batches, all_kinds, union, desc=f"{desc} (shared)", **pass_kw)
    full, n_batches = share.memo[key]
    subset = {
        k: SiteStatistics(k, mode, {i: full[k].layers[i].copy() for i in layer_ids}, full[k].architecture_id)
        for k in kinds
    }
    return subset, n_batches, getattr(stream, "fingerprint", 0)


#: The largest fraction of a batch's rows (its padding, or the tokens a mode leaves out) that a dense site's
#: statistics zero in their float64 copy (:meth:`RunningStats.update`'s ``exclude``) rather than gather the others
#: with ``index_select``. Measured on a CPU (1024 rows of width 1536, 2 threads): with 2% left out, zeroing takes
#: 13% (moments) to 19% (Σ|x|) less time than gathering; the two break even at about 10% (moments) to 15% left out.
_EXCLUDE_AT_MOST = 0.1


def _all_dense_sites_ran(stats: dict[str, dict[int, RunningStats]], by_layer: dict[int, FFLSite]) -> bool:
    """Whether the dense sites have counted rows (``False``: none has yet); raises when some have and others not: a
    dense site sees every selected token, unless the forward skipped its layer. Checked after each batch until one
    counts rows, so the error comes at once, not after the whole pass."""
    for kind, per_layer in stats.items():
        dense = {i: s.count for i, s in per_layer.items() if not by_layer[i].routed}
        unseen = [i for i, n in dense.items() if n == 0]
        if unseen and len(unseen) < len(dense):
            raise ValueError(
                f"The {kind} sites of layers {unseen} ({by_layer[unseen[0]].key_name}, ...) saw no tokens while "
                "others did: the forward did not run them (a layer these inputs skip, as Mllama's cross-attention "
                "layers without an image). Leave them out of the sites."
            )
        if unseen:
            return False
    return True


def _digest(batches: list[TokenBatch]) -> str:
    """A fingerprint of the tokens and the selection of ``batches``."""
    h = hashlib.sha1()
    for b in batches:
        for t in (b.input_ids, b.attention_mask, b.select):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _run_pass(
    model: nn.Module,
    batches: Any,
    kinds: Sequence[str],
    layer_ids: list[int],
    *,
    by_layer: dict[int, FFLSite],
    track: bool,
    statistics: Mapping[str, tuple[str, ...]],
    mode: str,
    n_examples: int | None,
    show_progress: bool,
    desc: str,
    device: torch.device,
    experts_own_forward: bool = False,
) -> tuple[dict[str, SiteStatistics], int]:
    """One forward pass over ``batches``, collecting ``kinds`` at ``layer_ids`` (stopping after the last)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    # a shared pass (several methods) may span layers without a pre-activation site: only the sites that exist
    stats = {
        k: {
            i: RunningStats.tracking(by_layer[i].d_ff, statistics[k] + (("extremes",) if track else ()))
            for i in layer_ids
            if k == "key" or by_layer[i].pre
        }
        for k in kinds
    }
    # the selected tokens, computed on the host once per batch and copied to each device once: as flat row indices
    # (boolean indexing on an accelerator would wait for the device to count the rows, a host sync) and, for expert
    # sites (rows: the tokens routed to the expert), as one flag per token of the batch
    selected: dict[tuple[str, torch.device], torch.Tensor | None] = {}
    grid = torch.Size()
    host = torch.device("cpu")

    def selected_on(what: str, device: torch.device) -> torch.Tensor | None:
        if (what, device) not in selected:
            on_host = selected[(what, host)]
            selected[(what, device)] = None if on_host is None else on_host.to(device, non_blocking=True)
        return selected[(what, device)]

    # the forward stops once every probed module of the last probed decoder layer has been read: a dense key site
    # as soon as its input arrives (its output projection never runs), a pre-activation site once it has run, the
    # experts module of routed sites once it has finished (a layer may compute its shared expert after the routed
    # ones); ``finishing``: id -> (module, read from its input)
    block = max(by_layer[i].decoder_layer for k in kinds for i in stats[k])
    finishing = {
        id(m): (m, k == "key" and not s.routed)
        for k in kinds
        for s in (by_layer[i] for i in stats[k])
        if s.decoder_layer == block
        for m in [s.key.owner if s.routed else (s.key if k == "key" else s.pre)]
    }
    finished: set[int] = set()

    def finish(module, *_) -> None:
        finished.add(id(module))
        if len(finished) == len(finishing):
            raise StopForward

    def make_hook(kind: str, layer: int):
        def capture(x: torch.Tensor) -> None:
            if x.dim() == 2 and x.shape[0] == grid.numel():
                x = as_token_grid(x, grid[1])  # OPT runs its FFL on [batch * seq, d_ff]
            if x.shape[-1] != by_layer[layer].d_ff or x.shape[:2] != grid:
                raise site_shape_error(
                    f"Layer {layer} {kind} site", tuple(x.shape), tuple(grid), by_layer[layer].d_ff
                )
            rows = x.flatten(0, 1)
            if selected[("exclude", host)] is not None:
                stats[kind][layer].update(rows, exclude=selected[("exclude", host)])
                return
            index = selected_on("index", x.device)
            stats[kind][layer].update(rows if index is None else rows.index_select(0, index))

        def capture_routed(x: torch.Tensor, token_index: torch.Tensor) -> None:
            if x.dim() != 2 or x.shape[-1] != by_layer[layer].d_ff:
                raise SiteError(
                    f"Layer {layer} {kind} site produced shape {tuple(x.shape)}, expected [tokens, "
                    f"{by_layer[layer].d_ff}]; the site does not match the model."
                )
            keep = selected_on("flags", x.device)
            stats[kind][layer].update(x if keep is None else x[keep.index_select(0, token_index)])

        site = by_layer[layer]
        if not site.routed:
            if kind == "pre":
                return lambda mod, args, out: capture(site.pre_activation(out))
            return lambda mod, args: capture(args[0])
        if kind == "pre":
            hook = lambda mod, args, out: capture_routed(site.pre_activation(out), args[1])  # noqa: E731
        else:
            hook = lambda mod, args: capture_routed(args[0], args[1])  # noqa: E731
        hook.unlearn_observer = experts_own_forward  # see sites.experts.ExpertTaps.mode
        return hook

    accepts_positions = accepts(model, "position_ids")

    def position_kwargs(mask: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {"position_ids": position_ids_from_mask(mask).to(device)} if accepts_positions else {}

    hooks = PassHooks()  # only this probe's forwards run them, not another thread's through the same modules
    try:
        for kind in kinds:
            for i in stats[kind]:
                s = by_layer[i]
                if kind == "pre":
                    hooks.post(s.pre, make_hook(kind, i))
                else:
                    hooks.pre(s.key, make_hook(kind, i))
        for m, on_input in finishing.values():
            (hooks.pre if on_input else hooks.post)(m, finish)
        bar = tqdm(total=n_examples, desc=desc, disable=not show_progress, unit="ex")
        meter, checked = PaddingMeter(), False
        for batch in batches:
            meter.add(batch.attention_mask)
            if batch.input_ids.numel() == 0:
                raise DataError("The texts tokenize to no tokens at all (empty strings?): nothing to probe.")
            lo, hi = int(batch.input_ids.min()), int(batch.input_ids.max())
            if lo < 0 or (vocab is not None and hi >= vocab):
                raise DataError(
                    f"Token id {lo if lo < 0 else hi} is outside the model's vocabulary "
                    f"(0..{'?' if vocab is None else vocab - 1}): the data was tokenized for another model."
                )
            select = batch.select.cpu()
            grid, every = select.shape, bool(select.all())
            selected.clear()
            finished.clear()
            selected[("index", host)] = None if every else select.flatten().nonzero()[:, 0]
            selected[("flags", host)] = None if every else select.flatten()
            # few rows left out (padding): zeroed in the statistics' float64 copy instead of gathering the others
            # (not with extremes, which must see the kept rows only)
            left_out = None if every or track else (~select.flatten()).nonzero()[:, 0]
            few = left_out is not None and left_out.numel() <= _EXCLUDE_AT_MOST * select.numel()
            selected[("exclude", host)] = left_out if few else None
            try:
                with hooks.running():
                    model(
                        input_ids=batch.input_ids.to(device),
                        attention_mask=batch.attention_mask.to(device),
                        **position_kwargs(batch.attention_mask, device),
                        use_cache=False,
                    )
            except StopForward:
                pass
            bar.update(batch.input_ids.shape[0])
            checked = checked or _all_dense_sites_ran(stats, by_layer)
        bar.close()
        meter.log(desc)
    finally:
        hooks.remove()
    fp = architecture_id(model)
    for per_layer in stats.values():
        for s in per_layer.values():
            s.to_("cpu")  # where saving, merging across processes and selection expect them
    return {k: SiteStatistics(k, mode, stats[k], fp) for k in kinds}, meter.batches
