"""Turning user data into padded token batches with a mask of the tokens to count.

Accepted inputs (the same for the probe and every ``fit``):

* a list of strings (full texts, or prompts in query mode);
* a list of dicts or a ``datasets.Dataset`` with a named text column, or prompt + completion columns;
* an iterable of tokenized batches: mappings with ``input_ids`` and ``attention_mask`` tensors (optionally a
  boolean ``select_mask`` of the tokens to count).

Token modes: ``"all"`` (every real token), ``"prompt"`` / ``"completion"`` (only that part of prompt +
completion pairs), ``"last"`` (query mode: the last real token of each prompt).

Batches: text is tokenized, truncated and cut into length-sorted batches of at most ``max_batch_tokens``
padded tokens (and ``batch_size`` rows, when given) by :func:`unlearn_hf.batch_plan.plan_batches`; tokenized
batches are read as given.

Sharding (data-parallel probing, see :mod:`unlearn_hf.distributed`): with ``shard=(rank, world_size)``,
:func:`iter_token_batches` yields only this process's share. The data is cut into the same batches as without
sharding and batch ``i`` goes to rank ``i % world_size``, so every example is probed exactly once, in exactly
the batch it would have been in on one process (tokenized batches: batch ``i`` of the iterable); a rank may get none.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batch_plan import default_batch_tokens, plan_batches
from .data_errors import DataError, DataTypeError, as_list, check_batch, refuse_non_examples
from .model_inputs import last_token_mask
from .sharding import ShardBatches, StreamShard, check_shard, fingerprint_rows, shard_batch_indices
from .tokenizing import TextTokenizer, shared_prefix_length

logger = logging.getLogger(__name__)

TOKEN_MODES = ("all", "prompt", "completion", "last")


@dataclass(frozen=True)
class DataSpec:
    """How to read examples out of user data.

    Args:
        text_column: column (or dict key) holding the full text, or the prompt in query mode.
        prompt_column / completion_column: columns of prompt + completion pairs; the text is their
            concatenation and the prompt's tokens are known, which the ``"prompt"``/``"completion"`` modes need.
        batch_size: at most this many examples per forward pass (``None``: as many as the token budget allows).
        max_length: truncation length in tokens (query mode truncates on the left, keeping the prompt's end).
        max_batch_tokens: at most this many padded tokens (rows × longest row) per forward pass; ``None``: the
            default of the model's device (:data:`unlearn_hf.batch_plan.DEFAULT_BATCH_TOKENS`).
    """

    text_column: str = "text"
    prompt_column: str | None = None
    completion_column: str | None = None
    batch_size: int | None = None
    max_length: int = 512
    max_batch_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length", "max_batch_tokens"):
            value = getattr(self, name)
            if value is None and name != "max_length":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if (self.prompt_column is None) != (
            self.completion_column is None
        ) and self.completion_column is not None:
            raise ValueError("completion_column needs prompt_column as well.")

    def batch_tokens(self, device: torch.device | str | None = None) -> int:
        """The token budget of one forward on ``device``: ``max_batch_tokens``, or the device's default."""
        return self.max_batch_tokens or default_batch_tokens(device)

    def plan(self, lengths: Sequence[int], device: torch.device | str | None = None) -> list[list[int]]:
        """Batches (example indices) of examples of the given token lengths (:func:`plan_batches`)."""
        return plan_batches(lengths, max_batch_tokens=self.batch_tokens(device), batch_size=self.batch_size)


@dataclass
class TokenBatch:
    """One padded batch: ``input_ids``/``attention_mask`` ``[B, T]`` and ``select`` (bool ``[B, T]``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    select: torch.Tensor


def _is_tokenized_batch(item: Any) -> bool:
    return isinstance(item, Mapping) and "input_ids" in item and torch.is_tensor(item["input_ids"])


def _columns_of(data: Any) -> list[str] | None:
    names = getattr(data, "column_names", None)
    if names is not None:
        return list(names)
    return None


def _records(data: Any, spec: DataSpec, mode: str) -> list[tuple[str, str | None]]:
    """Return ``(text_or_prompt, completion_or_None)`` pairs out of strings, dicts or a Dataset."""
    wants_pairs = mode in ("prompt", "completion") or (spec.prompt_column is not None and mode != "last")
    if wants_pairs and None in (spec.prompt_column, spec.completion_column):
        raise ValueError(
            f"Token mode {mode!r} reads prompt + completion pairs: name both prompt_column and completion_column "
            f"(got {spec.prompt_column!r} and {spec.completion_column!r})."
        )
    # the fields read: the prompt (query mode), prompt and completion (pairs) or the text
    if mode == "last":
        needed = [spec.prompt_column or spec.text_column]
    else:
        needed = [spec.prompt_column, spec.completion_column] if wants_pairs else [spec.text_column]
    columns = _columns_of(data)
    if columns is not None:  # datasets.Dataset (or anything column-addressable)
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(
                f"Column(s) {missing} not found in the data set; available columns: {columns}."
                + (f" Token mode {mode!r} needs prompt_column and completion_column." if wants_pairs else "")
            )
        if len(needed) == 2:
            records = list(zip(data[needed[0]], data[needed[1]]))
        else:
            records = [(t, None) for t in data[needed[0]]]
        return _check_text(records, wants_pairs)
    records = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            if wants_pairs:
                raise DataError(
                    f"Token mode {mode!r} needs prompt + completion pairs (dicts or a Dataset with prompt_column "
                    "and completion_column), got plain strings."
                )
            records.append((item, None))
        elif isinstance(item, Mapping):
            missing = [k for k in needed if k not in item]
            if missing:
                raise DataError(f"Example {i} has no key(s) {missing}; available keys: {sorted(item)}.")
            records.append((item[needed[0]], item[needed[1]] if len(needed) == 2 else None))
        elif isinstance(item, Sequence) and len(item) == 2 and all(isinstance(s, str) for s in item):
            records.append((item[0], item[1]) if mode != "last" else (item[0], None))
        else:
            raise DataTypeError(
                f"Example {i} is a {type(item).__name__}; expected a string, a dict or a pair."
            )
    return _check_text(records, wants_pairs)


def _check_text(records: list[tuple[Any, Any]], pairs: bool) -> list[tuple[str, str | None]]:
    """``records`` once every text (and, for ``pairs``, every completion) is a string, not ``None`` or a number."""
    for i, (a, b) in enumerate(records):
        for value in (a, b) if pairs or b is not None else (a,):
            if not isinstance(value, str):
                raise DataTypeError(f"Example {i} does not hold text (got {type(value).__name__}).")
    return records


def _shard_rows(data: Any, rows: list[int]) -> Any:
    """The given rows of a list or a column-addressable data set (``datasets.Dataset.select``)."""
    if _columns_of(data) is not None:
        if not hasattr(data, "select"):
            raise TypeError(f"Cannot shard a {type(data).__name__}: it has no .select(indices) method.")
        return data.select(rows)
    return [data[i] for i in rows]


def iter_token_batches(
    data: Any,
    tokenizer: Any = None,
    *,
    mode: str = "all",
    spec: DataSpec | None = None,
    shard: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> tuple[int | None, Iterator[TokenBatch]]:
    """Return ``(number_of_examples_or_None, iterator of TokenBatch)`` for any accepted input.

    Args:
        shard: ``(rank, world_size)``: yield only the batches of that rank (batch ``i`` goes to rank
            ``i % world_size``); the count is then this rank's, possibly 0, and an empty share is not an error
            (emptiness of the whole data is still checked where it is known up front).
        device: where the batches will run, for the default token budget (:meth:`DataSpec.batch_tokens`).

    Raises:
        ValueError: empty data, missing columns, unknown mode, no tokenizer for text.
    """
    spec = spec or DataSpec()
    if mode not in TOKEN_MODES:
        raise ValueError(f"Unknown token mode {mode!r}; choose one of {TOKEN_MODES}.")
    rank, world_size = check_shard(shard) if shard is not None else (0, 1)
    data = as_list(data)
    if isinstance(data, Mapping) and _is_tokenized_batch(data):
        data = [data]
    _refuse_containers(data)
    if not isinstance(data, Sequence) and _columns_of(data) is None:  # a generator of tokenized batches
        if shard is None:
            return None, _tokenized_iter(enumerate(data), mode)
        stream = StreamShard(enumerate(data), rank, world_size)
        return None, ShardBatches(_tokenized_iter(stream, mode, allow_empty=True), stream.fingerprint)
    if len(data) == 0:
        raise DataError("The data set is empty: at least one example is needed.")
    if _columns_of(data) is None and _is_tokenized_batch(data[0]):
        mine = shard_batch_indices(len(data), rank, world_size)
        n = sum(int(data[i]["input_ids"].shape[0]) for i in mine)
        batches = _tokenized_iter(((i, data[i]) for i in mine), mode, allow_empty=shard is not None)
        if shard is None:
            return n, batches
        rows = (row.tolist() for b in data if _is_tokenized_batch(b) for row in b["input_ids"])
        return n, ShardBatches(batches, fingerprint_rows(rows))
    records = _records(data, spec, mode)
    tok = TextTokenizer.of(tokenizer, mode)
    rows = _encode_rows(records, tok, spec.max_length)
    # refused whatever the batching (a batch of empty rows has no tokens at all)
    refuse_empty([ids for ids, _ in rows])
    plan = spec.plan([len(ids) for ids, _ in rows], device)
    if shard is None:
        return sum(len(b) for b in plan), _text_iter(rows, plan, tok, mode)
    mine = [plan[i] for i in shard_batch_indices(len(plan), rank, world_size)]
    return sum(len(b) for b in mine), ShardBatches(
        _text_iter(rows, mine, tok, mode), fingerprint_rows(i for i, _ in rows)
    )


def _refuse_containers(data: Any) -> None:
    """Refuse, in words, the ``datasets`` containers that are not one data set: a ``DatasetDict`` (several splits)
    and a streaming ``IterableDataset`` (no length: the fit sorts examples by length and plans batches); and what is
    no collection of examples (:func:`~unlearn_hf.data_errors.refuse_non_examples`)."""
    refuse_non_examples(data)
    if isinstance(data, Mapping) and data and all(_columns_of(v) is not None for v in data.values()):
        raise DataError(
            f"The data is a {type(data).__name__} of splits {list(data)}: pass one split, e.g. data[{next(iter(data))!r}]."
        )
    if (_columns_of(data) is not None or hasattr(data, "take")) and not hasattr(data, "__len__"):
        raise DataError(
            f"A streaming {type(data).__name__} has no length, and a fit sorts its examples by length: pass a "
            "datasets.Dataset or a list (e.g. datasets.Dataset.from_list(list(data.take(n))))."
        )


#: Batch keys that are model inputs a fit does not pass on (images, audio, positions, embeddings); other columns
#: (labels, the text, ids, ``special_tokens_mask``) do not change the forward and are left alone.
_FORWARD_INPUT = re.compile(
    r"(pixel|image|video|audio)_\w+|input_features|position_ids|inputs_embeds|cache_position|aspect_ratio_\w+"
    r"|cross_attention_mask|mm_token_type_ids"
)


def _changes_the_forward(key: str, value: Any) -> bool:
    """Whether batch column ``key`` is a model input a fit would silently drop (``token_type_ids`` only when not
    all zero: tokenizers return zeros for single texts)."""
    if key == "token_type_ids":
        return torch.is_tensor(value) and bool(value.any())
    return bool(_FORWARD_INPUT.fullmatch(key))


def _tokenized_iter(
    batches: Iterable[tuple[int, Mapping[str, Any]]], mode: str, allow_empty: bool = False
) -> Iterator[TokenBatch]:
    seen, warned = allow_empty, False
    for i, b in batches:
        if not _is_tokenized_batch(b):
            raise DataTypeError(
                f"Batch {i} is not a mapping with an 'input_ids' tensor. Data that is not a list, tuple or Dataset "
                "is read as tokenized batches; pass texts as a list of strings or dicts, or a datasets.Dataset "
                "(a dict of lists: datasets.Dataset.from_dict(...); tokenizer output: return_tensors='pt')."
            )
        unread = sorted(k for k in b if _changes_the_forward(k, b[k]))
        if unread:
            raise DataError(
                f"Batch {i} has {unread}, model inputs that a fit does not pass to the model (it reads input_ids and "
                "attention_mask, and select_mask where given): statistics without them would describe other "
                "activations. Fit on text-only batches; image and other model inputs are not supported in fitting."
            )
        check_batch(i, b)
        ids = b["input_ids"]
        mask = b.get("attention_mask")
        if mask is None and ids.ndim == 2 and ids.shape[0] > 1 and not warned:
            warned = True  # as transformers does: rows of one length need no mask, padded rows do
            logger.warning(
                "Batch %d has %d rows and no attention_mask: every token counts, padding included (pass the "
                "tokenizer's attention_mask with the input_ids).",
                i,
                ids.shape[0],
            )
        mask = torch.ones_like(ids) if mask is None else mask
        if mode == "last":
            select = last_token_mask(mask)
        elif "select_mask" in b:
            select = b["select_mask"].bool() & mask.bool()
        elif mode == "all":
            select = mask.bool()
        else:
            raise DataError(f"Token mode {mode!r} on tokenized batches needs a 'select_mask' in each batch.")
        seen = True
        yield TokenBatch(ids, mask, select)
    if not seen:
        raise DataError("The data set is empty: the iterable yielded no batches.")


def refuse_empty(rows: list[list[int]]) -> None:
    """Refuse examples whose token ids are empty, naming the first five by their index in ``rows``."""
    empty = [i for i, ids in enumerate(rows) if not ids]
    if empty:
        raise DataError(
            f"{len(empty)} of {len(rows)} examples tokenize to no tokens at all (empty strings?), e.g. example(s) "
            f"{empty[:5]}: remove them."
        )


def encode_pair(tok: TextTokenizer, prompt: str, completion: str | None) -> tuple[list[int], int]:
    """``(token ids, number of prompt tokens)``. A pair is tokenized as the text it joins (part by part, SentencePiece
    read ``"2+3=" + "5"`` as ``"2+3= 5"`` and an appended EOS came between the parts); its prompt tokens are those it
    shares from the start with the prompt tokenized alone (``"A: " + "Paris"``: ``" Paris"`` is a completion token)."""
    alone = tok.encode(prompt)
    if completion is None:
        return alone, len(alone)
    ids = tok.encode(prompt + completion)
    return ids, shared_prefix_length(alone, ids)


def _encode_rows(
    records: list[tuple[str, str | None]], tok: TextTokenizer, max_length: int
) -> list[tuple[list[int], int]]:
    """Token ids and prompt-token count of each record, truncated to ``max_length`` on the tokenizer's side."""
    rows = [encode_pair(tok, p, c) for p, c in records]
    long = sum(len(ids) > max_length for ids, _ in rows)
    if long:
        kept = "end" if tok.truncation_side == "left" else "beginning"
        logger.warning(
            "%d of %d rows are longer than max_length=%d tokens: only their %s is read (pass max_length=... to "
            "read more).",
            long,
            len(rows),
            max_length,
            kept,
        )
    return [_truncate(ids, n_prompt, max_length, tok.truncation_side) for ids, n_prompt in rows]


def _text_iter(
    rows: list[tuple[list[int], int]], plan: list[list[int]], tok, mode: str
) -> Iterator[TokenBatch]:
    for batch in plan:
        chunk = [rows[i] for i in batch]
        ids, mask = _pad([ids for ids, _ in chunk], tok.pad_token_id, tok.padding_side)
        if mode == "last":
            select = last_token_mask(mask)
        elif mode == "all":
            select = mask.bool()
        else:
            select = _part_mask([n for _, n in chunk], mask, prompt=(mode == "prompt"))
        yield TokenBatch(ids, mask, select)


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``rows`` padded with ``pad_id`` on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, where] = torch.tensor(row, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask


def _truncate(ids: list[int], n_prompt: int, max_length: int, side: str) -> tuple[list[int], int]:
    """Cut ``ids`` to ``max_length`` tokens on ``side``; returns the ids and how many of them are prompt tokens."""
    if len(ids) <= max_length:
        return ids, n_prompt
    if side == "left":
        cut = len(ids) - max_length
        return ids[cut:], max(0, n_prompt - cut)
    return ids[:max_length], min(n_prompt, max_length)


def _part_mask(n_prompt: list[int], mask: torch.Tensor, prompt: bool) -> torch.Tensor:
    """Mask of the prompt (or completion) tokens of prompt + completion rows, for either padding side."""
    m = mask.bool()
    # position of each token among the row's real tokens (0 for the first real token)
    rank = m.long().cumsum(1) - 1
    n_prompt_t = torch.tensor(n_prompt).unsqueeze(1)
    part = rank < n_prompt_t if prompt else rank >= n_prompt_t
    return part & m
