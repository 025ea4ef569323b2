"""Data-parallel fitting over several processes (``torchrun``, ``accelerate launch``).

When a default ``torch.distributed`` process group is initialized, :func:`unlearn_hf.probe` (and therefore every
method's ``fit``) probes only this process's shard of the data and combines the statistics of all processes with
collectives, so every rank ends with the same statistics, hence the same fitted method, equal to the
single-process result up to float64 rounding:

* sharding: the data is cut into the same batches as on one process and batch ``i`` goes to rank
  ``i % world_size`` (see :mod:`unlearn_hf.data`); a rank may get no batch and still takes part;
* combining: every rank ``all_gather``\\ s each rank's (count, mean, M2, sum |x|, min, max) and merges them in
  rank order with Chan's formula (:meth:`~unlearn_hf.stats.RunningStats.merge_`): the same operations in the same
  order on every rank, so the results are bitwise identical across ranks;
* the passes a fit makes after probing (``ratio="auto"``'s held-out scoring, Key Space Detection's calibration)
  are split the same way and summed over the ranks (:func:`sum_sharded`), so the choices made from them are the
  same on every rank by construction (not by relying on bit-identical forwards on every rank's hardware);
* errors: a failure on one rank (bad example in its shard, a token id outside the vocabulary, ...) is
  announced to all ranks before any statistics are exchanged, and every rank raises: the failing rank its own
  exception, the others a :class:`DistributedProbeError` carrying the failing rank's message. No rank waits
  forever for a collective that another rank never reaches.

Works with ``gloo`` (CPU) and ``nccl`` (GPU; collective tensors then live on the current CUDA device). Without a
process group, probing is the plain single-process probe. Opt out per call with ``probe(..., distributed=False)``
or for a block of code (e.g. a ``fit``) with :func:`distributed_probing`.

Every rank must make the same probe / fit calls with the same arguments and the same (full) data, in the same
order: each one picks its own shard. Both are checked when the ranks exchange their statistics (a hash of what was
probed, and one of the whole data's token rows: a per-rank split or shuffle is refused on every rank). Precomputed :class:`~unlearn_hf.stats.SiteStatistics` given to a ``fit`` are used as they
are; combine per-rank statistics first with :func:`all_reduce_statistics`. Errors are shared only once probing
starts: a rank that fails or stops before it reaches the probe leaves the others waiting for the process
group's timeout.

Typical use, the same script on every rank::

    from accelerate import PartialState  # or torch.distributed.init_process_group()
    from unlearn_hf.distributed import is_main_process

    state = PartialState()
    unlearned = UnlearnedModelForCausalLM.from_base(model.to(state.device))
    unlearned.fit(NeuronAdjustConfig(), forget, retain, tokenizer)  # each rank probes its shard
    if is_main_process():
        unlearned.save_pretrained("out")  # every rank holds the same fitted state; rank 0 alone saves
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar

import torch
import torch.distributed as dist

from .sharding import owns_batch
from .stats import RunningStats, SiteStatistics

logger = logging.getLogger(__name__)

#: Bytes of an error message sent to the other ranks (longer messages are cut at a character boundary).
MESSAGE_BYTES = 4096

_MODE: ContextVar[bool | None] = ContextVar("unlearn_hf_distributed", default=None)
_warned_no_group = False


class DistributedProbeError(RuntimeError):
    """Raised on every healthy rank when probing (or another pass of a fit split between the ranks: held-out scoring,
    Key Space Detection's calibration) failed on another rank; the message names the pass.

    Attributes:
        rank: the (lowest) failing rank.
        message: its error, as ``"ExceptionType: message"``.
    """

    def __init__(self, rank: int, message: str, stage: str = "Probing") -> None:
        super().__init__(f"{stage} failed on rank {rank}: {message}")
        self.rank = rank
        self.message = message


def is_distributed() -> bool:
    """Whether a default ``torch.distributed`` process group is initialized in this process."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, and in a plain single process: the process that should save, print or push."""
    return get_rank() == 0


@contextlib.contextmanager
def distributed_probing(enabled: bool | None) -> Iterator[None]:
    """Within the block, probes whose ``distributed`` argument is ``None`` use ``enabled`` instead of detecting the
    process group: ``False`` makes every ``fit`` inside probe all of its data locally (no collectives), ``True``
    requires a process group, ``None`` restores detection.
    """
    if enabled not in (None, True, False):
        raise TypeError(f"enabled must be None, True or False, got {enabled!r}.")
    token = _MODE.set(enabled)
    try:
        yield
    finally:
        _MODE.reset(token)


def resolve_distributed(distributed: bool | None = None) -> bool:
    """Whether a probe should shard its data and combine statistics across processes.

    Args:
        distributed: ``True`` (require a process group), ``False`` (never) or ``None`` (the value set by
            :func:`distributed_probing`, else: whether a default process group is initialized).

    Raises:
        ValueError: ``True`` without an initialized process group.
    """
    if distributed is None:
        distributed = _MODE.get()
    if distributed not in (None, True, False):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}.")
    if distributed is None:
        if not is_distributed():
            _warn_if_launched_without_group()
        return is_distributed()
    if distributed and not is_distributed():
        raise ValueError(
            "distributed=True needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group() (or create accelerate's PartialState()) first."
        )
    return bool(distributed)


def _warn_if_launched_without_group() -> None:
    global _warned_no_group
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return
    if world > 1 and not _warned_no_group:
        _warned_no_group = True
        logger.warning(
            "WORLD_SIZE=%d but no torch.distributed process group is initialized: every process probes all of "
            "the data. Call torch.distributed.init_process_group() (or create accelerate's PartialState()) "
            "before fitting to split the work.",
            world,
        )


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device collective tensors must live on for the process group's backend: CPU for gloo, the current CUDA
    device for NCCL (set it per rank with ``torch.cuda.set_device(local_rank)``; accelerate does)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if "nccl" in backend and torch.cuda.is_available():  # as torch's all_gather_object does
        return torch.device("cuda", torch.cuda.current_device())
    accelerator = getattr(torch, "accelerator", None)  # other device backends (torch >= 2.6)
    if accelerator is not None and accelerator.is_available():
        return torch.device(accelerator.current_accelerator().type, accelerator.current_device_index())
    return torch.device("cpu")


def _all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    device = collective_device(group)
    local = tensor.to(device).contiguous()
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, local, group=group)
    return [t.cpu() for t in out]


def _layout(results: Mapping[str, SiteStatistics]) -> list[tuple[str, int, int, tuple[str, ...]]]:
    """(site, layer, dim, kept quantities) of every accumulator, in a fixed order."""
    return [
        (kind, i, st.dim, st.quantities)
        for kind in sorted(results)
        for i, st in sorted(results[kind].layers.items())
    ]


def _signature(results: Mapping[str, SiteStatistics]) -> int:
    """A 62-bit hash of what was probed (sites, modes, layers, widths, model), to refuse mismatched ranks."""
    parts = [repr(_layout(results))]
    parts += [f"{k}:{results[k].mode}:{results[k].architecture_id}" for k in sorted(results)]
    return int.from_bytes(hashlib.sha1("|".join(parts).encode()).digest()[:8], "little") >> 2


def _encode_message(error: BaseException) -> torch.Tensor:
    text = f"{type(error).__name__}: {error}".encode()[:MESSAGE_BYTES]
    text = text.decode("utf-8", errors="ignore").encode()  # never cut a character in half
    buf = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    buf[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else buf[:0]
    return buf


def _raise_failures(
    flags: torch.Tensor, error: BaseException | None, group: dist.ProcessGroup | None, stage: str = "Probing"
) -> None:
    """Once the ranks have exchanged whether they failed (``flags[r]``), raise on every rank if one did: the rank's
    own exception on a failing rank, :class:`DistributedProbeError` (the lowest failing rank's message) on the
    others. A collective when one failed (the messages are exchanged)."""
    failing = flags.nonzero().squeeze(1).tolist()
    if not failing:
        return
    message = _encode_message(error) if error is not None else torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    texts = _all_gather(message, group)
    if error is not None:
        raise error
    raw = bytes(texts[failing[0]].tolist()).rstrip(b"\0")
    raise DistributedProbeError(failing[0], raw.decode("utf-8", errors="replace"), stage)


def fit_shard() -> tuple[int, int]:
    """``(rank, world_size)`` of the passes a fit makes besides its probes (``ratio="auto"``'s held-out scoring, Key
    Space Detection's calibration): the process group's when the fit's probes are distributed (see
    :func:`resolve_distributed`), else ``(0, 1)``."""
    return (get_rank(), get_world_size()) if resolve_distributed(None) else (0, 1)


def sum_sharded(work: Callable[[Callable[[int], bool]], torch.Tensor], stage: str) -> torch.Tensor:
    """Run a pass over batches split between the ranks and sum its result over them, identically on every rank.

    ``work(mine)`` runs the batches ``i`` for which ``mine(i)`` is true (batch ``i`` is rank ``i % world_size``'s,
    as in a probe) and returns a tensor of the same shape and dtype on every rank, zero where other ranks' batches
    would write; the sum over the ranks is then exactly the single-process result (integer counts, or values next to
    zeros), the same on every rank, so every rank makes the same choice from it. Without distribution (see
    :func:`fit_shard`): ``work`` over every batch. A failure on one rank is raised on every rank (``stage`` names
    the pass in the others' :class:`DistributedProbeError`), never left for the others to wait on.
    """
    rank, world = fit_shard()
    if world == 1:
        return work(lambda i: True)
    try:
        local = work(lambda i: owns_batch(i, rank, world))
    except Exception as err:
        _sum_over_ranks(None, err, stage)
        raise  # not reached: the line above raises err
    return _sum_over_ranks(local, None, stage)


def _sum_over_ranks(local: torch.Tensor | None, error: BaseException | None, stage: str) -> torch.Tensor:
    failed = error is not None
    header = torch.tensor([int(failed), 0 if failed else local.numel()], dtype=torch.int64)
    headers = torch.stack(_all_gather(header, None))
    _raise_failures(headers[:, 0], error, None, stage)
    if len(set(headers[:, 1].tolist())) != 1:
        raise ValueError(
            f"{stage}: the ranks produced results of different sizes {headers[:, 1].tolist()}; every rank must fit "
            "with the same arguments and the same data."
        )
    out = local.to(collective_device(None), copy=True).contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


#: The float64 vectors of each kept quantity, in packing order.
_PARTS = {"moments": ("mean", "m2"), "abs": ("abs_sum",), "extremes": ("minimum", "maximum")}


def _pack(results: Mapping[str, SiteStatistics]) -> tuple[torch.Tensor, torch.Tensor]:
    """All accumulators as one float64 vector and their counts as one int64 vector."""
    floats, counts = [], []
    for kind, i, _, quantities in _layout(results):
        st = results[kind].layers[i]
        floats += [getattr(st, name) for q in quantities for name in _PARTS[q]]
        counts.append(st.count)
    flat = torch.cat([t.to(torch.float64).cpu() for t in floats]) if floats else torch.zeros(0)
    return flat, torch.tensor(counts, dtype=torch.int64)


def _unpack(
    flat: torch.Tensor, counts: torch.Tensor, layout: list[tuple[str, int, int, tuple[str, ...]]]
) -> dict[tuple[str, int], RunningStats]:
    out, pos = {}, 0
    for n, (kind, i, dim, quantities) in enumerate(layout):
        parts = {}
        for name in (name for q in quantities for name in _PARTS[q]):
            parts[name] = flat[pos : pos + dim].clone()
            pos += dim
        out[(kind, i)] = RunningStats.tracking(dim, quantities, count=int(counts[n]), **parts)
    return out


def exchange_statistics(
    local: Mapping[str, SiteStatistics] | None,
    error: BaseException | None = None,
    *,
    n_batches: int = 0,
    data_fingerprint: int = 0,
    group: dist.ProcessGroup | None = None,
) -> tuple[dict[str, SiteStatistics], int]:
    """Combine every rank's probe results; a collective: every rank of ``group`` must call it.

    Args:
        local: this rank's results (``{site: SiteStatistics}``), ``None`` when it failed.
        error: this rank's exception, if it failed.
        n_batches: how many batches this rank probed.
        data_fingerprint: :func:`~unlearn_hf.sharding.fingerprint_rows` of the whole data this rank was given.
        group: process group (default: the default group).

    Returns:
        ``(merged results, total number of batches)``, identical on every rank.

    Raises:
        The rank's own exception on a failing rank; :class:`DistributedProbeError` (naming the lowest failing
        rank and its message) on the others; ``ValueError`` on every rank when ranks probed different things or were
        given different data.
    """
    if local is None and error is None:
        raise ValueError("exchange_statistics needs this rank's results or its error.")
    failed = error is not None
    signature = 0 if failed else _signature(local)
    header = torch.tensor([int(failed), signature, int(n_batches), int(data_fingerprint)], dtype=torch.int64)
    headers = torch.stack(_all_gather(header, group))
    _raise_failures(headers[:, 0], error, group)
    if len(set(headers[:, 1].tolist())) != 1:
        raise ValueError(
            "The ranks probed different sites, layers, token modes or models; every rank must call probe / fit "
            "with the same arguments and the same model."
        )
    if len(set(headers[:, 3].tolist())) != 1:
        raise ValueError(
            "The ranks were given different data (other examples, fewer, or the same in another order): every rank "
            "must pass the same full data, in the same order; each probes its own share of it. Do not split the "
            "data per rank yourself (e.g. data[rank::world_size], a DistributedSampler or a per-rank generator of "
            "batches) or shuffle it with a per-rank seed."
        )
    layout = _layout(local)
    flat, counts = _pack(local)
    all_flat, all_counts = _all_gather(flat, group), _all_gather(counts, group)
    merged = {(kind, i): RunningStats.tracking(dim, quantities) for kind, i, dim, quantities in layout}
    for rank_flat, rank_counts in zip(all_flat, all_counts):  # rank order: the same result on every rank
        for key, st in _unpack(rank_flat, rank_counts, layout).items():
            merged[key].merge_(st)
    out = {
        kind: SiteStatistics(
            st.site,
            st.mode,
            {i: merged[(kind, i)] for i in sorted(st.layers)},
            st.architecture_id,
        )
        for kind, st in local.items()
    }
    return out, int(headers[:, 2].sum())


def all_reduce_statistics(
    stats: SiteStatistics | Mapping[str, SiteStatistics], group: dist.ProcessGroup | None = None
) -> SiteStatistics | dict[str, SiteStatistics]:
    """Merge statistics that each rank computed on its own data (e.g. with ``probe(..., distributed=False)``) into
    the statistics of all of it, on every rank. A collective: every rank must call it, with the same structure.
    """
    if not is_distributed():
        raise ValueError("all_reduce_statistics needs an initialized torch.distributed process group.")
    single = isinstance(stats, SiteStatistics)
    local = {stats.site: stats} if single else dict(stats)
    merged, _ = exchange_statistics(local, None, group=group)
    return merged[stats.site] if single else merged
