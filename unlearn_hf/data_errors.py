"""Errors about the data a fit reads: :mod:`unlearn_hf.data` raises them naming the example, batch or column,
and a fit puts the data set's role in front ("The retain data: Example 3 is a NoneType ..."); and the checks that
refuse data a fit cannot read before it is read."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch


class DataError(ValueError):
    """The data a fit reads cannot be used (the message names the example, batch or column); a fit puts the data
    set's role in front ("The retain data: ...")."""


class DataTypeError(TypeError):
    """The data a fit reads is of the wrong kind (see :class:`DataError`)."""


def refuse_non_examples(data: Any) -> None:
    """Refuse, in words, what is not a collection of examples or batches: a string, a path (load the file first), a
    set (no order), a pandas DataFrame (iterating it yields its column names)."""
    if isinstance(data, (str, bytes, os.PathLike)):
        kind = "path" if isinstance(data, os.PathLike) else "single string"
        raise DataTypeError(
            f"The data is a {kind}, not examples: pass a list of texts, or load a file first "
            "(datasets.load_dataset('json', data_files=...)['train'], or 'csv' / 'parquet' / 'text')."
        )
    if isinstance(data, (set, frozenset)):
        raise DataTypeError("The data is a set, which has no order: pass a list (sorted(...) or list(...)).")
    if type(data).__module__.split(".")[0] == "pandas" and type(data).__name__ == "DataFrame":
        raise DataTypeError(
            "The data is a pandas DataFrame: pass a Dataset (datasets.Dataset.from_pandas(frame)) or a column's "
            "values (list(frame['text']))."
        )


def as_list(data: Any) -> Any:
    """A numpy array or a pandas Series of examples as a list (neither is a ``Sequence``: they were read as tokenized
    batches); other data as it is."""
    kind = (type(data).__module__.split(".")[0], type(data).__name__)
    return data.tolist() if kind in (("numpy", "ndarray"), ("pandas", "Series")) else data


def check_batch(i: int, batch: Mapping[str, Any]) -> None:
    """Refuse a tokenized batch whose ``input_ids``, ``attention_mask`` or ``select_mask`` a fit cannot read, naming
    batch ``i`` and what is wrong (before a forward fails on it with a shape or index error)."""
    ids = batch["input_ids"]
    if ids.ndim != 2:
        one = " (one row: input_ids[None])" if ids.ndim == 1 else ""
        raise DataError(f"Batch {i}: input_ids has shape {tuple(ids.shape)}; a batch is [rows, tokens]{one}.")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise DataTypeError(f"Batch {i}: input_ids are {ids.dtype}; token ids are integers.")
    if ids.numel() == 0:
        raise DataError(f"Batch {i} is empty (input_ids of shape {tuple(ids.shape)}): leave it out.")
    for key in ("attention_mask", "select_mask"):
        value = batch.get(key)
        if value is None:
            continue
        if not torch.is_tensor(value) or value.shape != ids.shape:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise DataError(f"Batch {i}: {key} {shape} != input_ids {tuple(ids.shape)}.")
        if key == "attention_mask" and bool(((value != 0) & (value != 1)).any()):
            raise DataError(
                f"Batch {i}: attention_mask holds values other than 0 and 1 (a packed-sequence mask?); a fit reads "
                "a 0/1 padding mask."
            )
