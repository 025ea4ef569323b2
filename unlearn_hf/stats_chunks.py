"""How :meth:`~unlearn_hf.stats.RunningStats.update` walks a batch of activations: in chunks of rows copied into a
float64 work buffer, the rows a batch leaves out (its padding) zeroed per chunk, and the row of ones whose product with
the buffer gives the column sums."""

from __future__ import annotations

import threading

import torch

#: Rows of the float64 copy ``update`` works on at a time: on a CPU, as many as fit :data:`_CPU_CHUNK_ELEMENTS` values
#: (1 MiB, so the copy and the reductions over it stay in cache: a SmolLM2 key-site probe ran in 16.0 s with chunks
#: of 64-128 rows against 18.5-19.1 s with 1024); elsewhere ``_CHUNK_ROWS`` values of each row, shared by the
#: blocks of the copy (fewer, larger kernels; the transient stays 1024 float64 rows).
_CHUNK_ROWS = 1024
_CPU_CHUNK_ELEMENTS = 1 << 17


def chunk_rows(dim: int, device: torch.device, blocks: int = 1) -> int:
    """How many rows of width ``dim`` :meth:`RunningStats.update` copies to float64 at a time on ``device``, for a
    copy of ``blocks`` blocks (x, x², |x|)."""
    return max(1, _CPU_CHUNK_ELEMENTS // dim) if device.type == "cpu" else max(1, _CHUNK_ROWS // blocks)


def scratch(rows: int, width: int, device: torch.device) -> torch.Tensor:
    """A float64 ``[rows, width]`` work buffer: on a CPU one per thread and shape, reused (a fresh megabyte costs
    page faults at every chunk); elsewhere a new one (the device's caching allocator reuses memory)."""
    if device.type != "cpu":
        return torch.empty(rows, width, dtype=torch.float64, device=device)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(width)
    if buf is None or buf.shape[0] < rows:
        buf = buffers[width] = torch.empty(rows, width, dtype=torch.float64)
    return buf[:rows]


_SCRATCH = threading.local()


def ones(n: int, device: torch.device) -> torch.Tensor:
    """A float64 row of ``n`` ones on ``device`` (``[1, n]``), sliced from one cached row per device."""
    row = _ONES.get(device)
    if row is None or row.shape[1] < n:
        row = _ONES[device] = torch.ones(1, max(n, _CHUNK_ROWS), dtype=torch.float64, device=device)
    return row[:, :n]


_ONES: dict[torch.device, torch.Tensor] = {}


def excluded_by_chunk(
    exclude: torch.Tensor, n: int, rows: int, device: torch.device
) -> list[torch.Tensor | None]:
    """The rows of ``exclude`` (sorted indices into ``n`` rows) per chunk of ``rows`` rows, as indices local to their
    chunk on ``device`` (``None``: none in that chunk). Cached for the last ``exclude`` seen: a probe excludes the
    same rows at every layer of a batch."""
    of, splits = getattr(_EXCLUDED, "last", (None, None))
    if of is not exclude:  # holding ``exclude`` keeps its identity unique
        splits = {}
        _EXCLUDED.last = (exclude, splits)
    key = (n, rows, device)
    out = splits.get(key)
    if out is None:
        starts = torch.arange(0, n + rows, rows).clamp_max_(n)
        bounds = torch.searchsorted(exclude, starts).tolist()
        out = splits[key] = [
            (exclude[lo:hi] - start).to(device, non_blocking=True) if hi > lo else None
            for start, lo, hi in zip(starts.tolist(), bounds[:-1], bounds[1:])
        ]
    return out


#: Per thread, the last rows excluded and their split per chunk layout (see :func:`excluded_by_chunk`).
_EXCLUDED = threading.local()
