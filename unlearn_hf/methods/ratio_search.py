"""Fitting the neuron-level methods (Neuron Adjust, Selective Pruning), and ``ratio="auto"``: the ratio that lowers
held-out forget accuracy most while held-out retain accuracy drops by at most a budget.

**How ``ratio="auto"`` chooses.** ``holdout_fraction`` of the forget examples and of the retain examples (a seeded
permutation, the same for every run) is kept out of the fit. The rest is probed **once**; for every ratio of the
grid the neurons are re-selected from those statistics (no probing per ratio), the method is attached to the model
for a moment, and the held-out examples are scored by teacher-forced next-token accuracy on the tokens the config
probes (``tokens``: every token after the first, or the completion / prompt part of pairs). A drop is relative to
the model as it ran before (with the methods already attached): ``(before − after) / before``. Every ratio of the
grid is scored (the retain drop need not grow with the ratio: on a small held-out set, or with Neuron Adjust's
random draws, a larger ratio can drop less), and the chosen ratio has the largest forget drop among the ratios
whose retain drop is within ``max_retain_drop`` (ties: the smaller ratio); when none is, the fit fails and nothing
is attached. The fitted config records the grid it searched (``ratio_grid``, the default filled in).
The fitted method keeps the curve (:class:`RatioCurve`, saved with it). The held-out examples are not fitted on:
the chosen method is fitted on the remaining ``1 − holdout_fraction``.

Distributed fits (``torch.distributed``) shard the probe as usual, and the held-out scoring too: each rank scores
its share of the batches and the counts of correct and scored tokens are summed over the ranks
(:func:`~unlearn_hf.distributed.sum_sharded`), so every rank computes the same accuracies, equal to one process's,
and makes the same choice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..context import disabled_for
from ..data import (
    DataSpec,
    TokenBatch,
    _columns_of,
    _is_tokenized_batch,
    _records,
    _refuse_containers,
    _shard_rows,
    iter_token_batches,
)
from ..data_errors import as_list
from ..distributed import sum_sharded
from ..holdout import example_key, holdout_split, repeated
from ..model_inputs import accepts, input_device, position_ids_from_mask
from ..stats import SiteStatistics
from .config import AUTO, NeuronSelectionConfig
from .fitting import check_examples, data_role, probe_forget_and_retain

logger = logging.getLogger(__name__)

#: The ratios ``ratio="auto"`` tries when the config names none.
DEFAULT_GRID = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)

#: Names of the saved tensors: the curve ``[G, 5]`` (ratio, forget accuracy, retain accuracy, forget drop, retain
#: drop per grid point), the accuracies before ``[2]`` and the index of the chosen point ``[1]``.
CURVE, BASE, CHOSEN = "ratio_curve", "ratio_base_accuracy", "ratio_chosen"


#: Float slack on the retain budget: 19 of 20 tokens kept is a drop of exactly 0.05, which computes as 0.05000000000000004.
BUDGET_TOLERANCE = 1e-9


class RatioSearchError(ValueError):
    """No ratio of the grid keeps the held-out retain drop within the budget."""


@dataclass(frozen=True)
class RatioCurve:
    """What ``ratio="auto"`` measured and chose.

    Attributes:
        ratios: the grid (an older save may stop at its first ratio beyond the budget).
        forget_accuracy / retain_accuracy: held-out accuracy with the method at each ratio.
        base_forget / base_retain: held-out accuracy before. chosen: index of the chosen ratio.
    """

    ratios: list[float]
    forget_accuracy: list[float]
    retain_accuracy: list[float]
    base_forget: float
    base_retain: float
    chosen: int

    @property
    def forget_drop(self) -> list[float]:
        return [_drop(self.base_forget, a) for a in self.forget_accuracy]

    @property
    def retain_drop(self) -> list[float]:
        return [_drop(self.base_retain, a) for a in self.retain_accuracy]

    @property
    def ratio(self) -> float:
        """The chosen ratio."""
        return self.ratios[self.chosen]

    def state(self) -> dict[str, torch.Tensor]:
        rows = list(
            zip(self.ratios, self.forget_accuracy, self.retain_accuracy, self.forget_drop, self.retain_drop)
        )
        return {
            CURVE: torch.tensor(rows, dtype=torch.float64),
            BASE: torch.tensor([self.base_forget, self.base_retain], dtype=torch.float64),
            CHOSEN: torch.tensor([self.chosen], dtype=torch.int64),
        }

    @classmethod
    def from_state(cls, state) -> RatioCurve | None:
        if CURVE not in state:
            return None
        curve = state[CURVE].tolist()
        return cls(
            [r[0] for r in curve],
            [r[1] for r in curve],
            [r[2] for r in curve],
            *state[BASE].tolist(),
            int(state[CHOSEN][0]),
        )

    def table(self) -> str:
        """The curve as a markdown table (the chosen row marked)."""
        lines = ["| ratio | forget drop | retain drop | |", "|---|---|---|---|"]
        for i, (r, f, t) in enumerate(zip(self.ratios, self.forget_drop, self.retain_drop)):
            lines.append(
                f"| {r:g} | {100 * f:.1f}% | {100 * t:.1f}% | {'chosen' if i == self.chosen else ''} |"
            )
        return "\n".join(lines)


def _drop(before: float, after: float) -> float:
    return (before - after) / before if before > 0 else 0.0


def curve_spec(config: NeuronSelectionConfig, state) -> dict[str, tuple[tuple, torch.dtype]]:
    """The saved tensors of a ``ratio="auto"`` fit (none for a fixed ratio)."""
    if config.ratio != AUTO:
        return {}
    g = (
        state[CURVE].shape[0]
        if CURVE in state and state[CURVE].dim() == 2
        else len(config.ratio_grid or DEFAULT_GRID)
    )
    return {CURVE: ((g, 5), torch.float64), BASE: ((2,), torch.float64), CHOSEN: ((1,), torch.int64)}


def validate_curve(state, config: NeuronSelectionConfig) -> None:
    """Refuse a saved curve whose ratios are not the start of the config's grid (the search stops at the first
    ratio beyond the budget) or whose chosen index is out of range."""
    if config.ratio != AUTO:
        return
    grid, ratios = list(config.ratio_grid or DEFAULT_GRID), state[CURVE][:, 0].tolist()
    if not ratios or ratios != grid[: len(ratios)]:
        raise ValueError(
            f"Tensor {CURVE!r} holds ratios {ratios}, not the start of the config's grid {grid}."
        )
    if not 0 <= int(state[CHOSEN][0]) < len(ratios):
        raise ValueError(
            f"Tensor {CHOSEN!r} names point {int(state[CHOSEN][0])} of a {len(ratios)}-point curve."
        )


# -- fitting ----------------------------------------------------------------------------------------------------
def fit_neuron_method(
    cls: Any,
    model: Any,
    config: NeuronSelectionConfig,
    forget: Any,
    retain: Any,
    tokenizer: Any,
    *,
    site: str,
    statistics: tuple[str, ...],
    spec: DataSpec,
    show_progress: bool,
) -> Any:
    """Fit ``cls`` (a method with ``from_statistics(config, layers, stats_f, stats_r, ratio, extra_state)``):
    probe, then select at ``config.ratio``, or search the ratio on held-out examples (module docstring)."""
    kw = dict(site=site, statistics=statistics, spec=spec, show_progress=show_progress, label=cls.label)
    if config.ratio != AUTO:
        layers, stats_f, stats_r = probe_forget_and_retain(model, config, forget, retain, tokenizer, **kw)
        return cls.from_statistics(config, layers, stats_f, stats_r, config.ratio)
    if retain is None:
        raise ValueError(f"{cls.label} needs retain data (got None).")
    # the grid searched, saved with the fit: a later version's default grid must not change what it means
    config = dataclasses.replace(config, ratio_grid=list(config.ratio_grid or DEFAULT_GRID))
    for role, data in (("forget", forget), ("retain", retain)):  # before the split: indices as given
        check_examples(data, spec, config.tokens, role, tokenizer)
    fit_f, held_f = split_examples(forget, config.holdout_fraction, "forget", spec, config.tokens)
    fit_r, held_r = split_examples(retain, config.holdout_fraction, "retain", spec, config.tokens)
    layers, stats_f, stats_r = probe_forget_and_retain(model, config, fit_f, fit_r, tokenizer, **kw)

    # tokenized once (and a truncation warning given once), scored at every ratio of the search
    device = input_device(model)
    held = []
    for role, d in (("forget", held_f), ("retain", held_r)):
        with data_role(f"{role} (held-out part)"):
            held.append(
                list(iter_token_batches(d, tokenizer, mode=config.tokens, spec=spec, device=device)[1])
            )

    def accuracy() -> tuple[float, float]:
        return tuple(batches_accuracy(model, batches, config.tokens) for batches in held)

    curve = search_ratio(
        model,
        config,
        lambda r: cls.from_statistics(dataclasses.replace(config, ratio=r), layers, stats_f, stats_r, r),
        accuracy,
        label=cls.label,
    )
    method = cls.from_statistics(config, layers, stats_f, stats_r, curve.ratio, curve.state())
    logger.info(
        "%s: ratio='auto' chose %g (held-out forget drop %.1f%%, retain drop %.1f%%, budget %.1f%%; %d + %d "
        "held-out examples)",
        cls.label,
        curve.ratio,
        100 * curve.forget_drop[curve.chosen],
        100 * curve.retain_drop[curve.chosen],
        100 * config.max_retain_drop,
        len(held_f),
        len(held_r),
    )
    return method


def search_ratio(
    model: Any,
    config: NeuronSelectionConfig,
    build: Callable[[float], Any],
    accuracy: Callable[[], tuple[float, float]],
    *,
    label: str,
) -> RatioCurve:
    """Score ``accuracy()`` (held-out forget, retain) before and with ``build(ratio)`` attached for every ratio of
    the grid, and choose (module docstring).

    Raises:
        RatioSearchError: no ratio keeps the retain drop within ``config.max_retain_drop``.
    """
    if disabled_for(model) is None:
        raise ValueError(
            f"{label}: ratio='auto' cannot be fitted inside disable_unlearning(): the block also switches off the "
            "method being measured, so every ratio would score no drop. Fit outside the block, or disable only "
            "named methods (disable_unlearning('name'))."
        )
    grid = list(config.ratio_grid or DEFAULT_GRID)
    base_f, base_r = accuracy()
    if base_r <= 0:
        raise RatioSearchError(
            f"{label}: the model predicts none of the held-out retain tokens (accuracy 0), so a retain drop cannot "
            "be measured; use a fixed ratio or other retain data."
        )
    acc_f, acc_r = [], []
    name = "__ratio_search__"
    for r in grid:
        model.add_method(name, build(r))
        try:
            f, t = accuracy()
        finally:
            model.remove_method(name)
        acc_f.append(f)
        acc_r.append(t)
        logger.info(
            "%s ratio %g: held-out forget accuracy %.4f (before %.4f), retain %.4f (before %.4f)",
            label,
            r,
            f,
            base_f,
            t,
            base_r,
        )
    curve = RatioCurve(grid, acc_f, acc_r, base_f, base_r, 0)
    ok = [i for i, d in enumerate(curve.retain_drop) if d <= config.max_retain_drop + BUDGET_TOLERANCE]
    if not ok:
        least = min(range(len(grid)), key=lambda i: curve.retain_drop[i])
        raise RatioSearchError(
            f"{label}: every ratio of the grid lowers held-out retain accuracy by more than max_retain_drop="
            f"{config.max_retain_drop:g} (the least: {curve.retain_drop[least]:.3f} at ratio {grid[least]:g}); "
            "raise the budget, add smaller ratios to ratio_grid, or set a fixed ratio."
        )
    best = max(ok, key=lambda i: (curve.forget_drop[i], -i))
    if curve.forget_drop[best] <= 0:
        logger.warning(
            "%s: no ratio within the retain budget lowers held-out forget accuracy; choosing %g anyway.",
            label,
            grid[best],
        )
    return dataclasses.replace(curve, chosen=best)


# -- held-out data ----------------------------------------------------------------------------------------------
def split_examples(
    data: Any, fraction: float, role: str, spec: DataSpec | None = None, mode: str = "all"
) -> tuple[Any, Any]:
    """Split examples (a list of strings/dicts/pairs or a ``datasets.Dataset``) into ``(fit, held-out)`` by a
    seeded permutation, keeping each part's order and copies of one example together; at least one held out and two
    fitted (:func:`~unlearn_hf.holdout.holdout_split`).

    Raises:
        ValueError: precomputed statistics, tokenized batches or an iterator (their examples cannot be held
            out), or too few examples.
    """
    if isinstance(data, SiteStatistics):
        raise ValueError(
            f"ratio='auto' holds out {role} examples to measure the drops, so it needs examples, not precomputed "
            "statistics; give the examples or a fixed ratio."
        )
    data = as_list(data)  # a numpy array or pandas Series of texts
    # a string, a path, a DatasetDict or a streaming data set: the same words as a fixed-ratio fit's
    _refuse_containers(data)
    is_table = _columns_of(data) is not None
    if not is_table and not isinstance(data, (list, tuple)):
        raise ValueError(
            f"ratio='auto' needs the {role} examples as a list or a datasets.Dataset (got "
            f"{type(data).__name__}); give a list or a fixed ratio."
        )
    if not is_table and data and _is_tokenized_batch(data[0]):
        raise ValueError(
            f"ratio='auto' holds out {role} examples, which tokenized batches do not allow; give the texts or a "
            "fixed ratio."
        )
    # what the fit reads of each example decides which are copies (a Dataset's other columns, e.g. an id, do not)
    records = _records(data, spec or DataSpec(), mode)
    keys = [example_key(p) if c is None else repr((p.strip(), c.strip())) for p, c in records]
    copies = repeated(keys)
    if copies:
        logger.info(
            "ratio='auto': %d %s examples repeat an earlier one; copies are held out together or not at all.",
            copies,
            role,
        )
    fit, held = holdout_split(
        keys,
        fraction,
        f"{{n}} {role} example(s) are too few for ratio='auto' to hold out {{n_held}} and fit on at least 2; give "
        "more examples or a fixed ratio.",
    )
    return _shard_rows(data, fit), _shard_rows(data, held)


def held_out_accuracy(model: Any, data: Any, tokenizer: Any, *, mode: str, spec: DataSpec) -> float:
    """Teacher-forced next-token accuracy of ``model`` on ``data``: the share of the tokens selected by ``mode``
    (and preceded by a real token) that are the model's top-1 prediction from the position before."""
    _, batches = iter_token_batches(data, tokenizer, mode=mode, spec=spec, device=input_device(model))
    return batches_accuracy(model, batches, mode)


def batches_accuracy(model: Any, batches: Iterable[TokenBatch], mode: str) -> float:
    """:func:`held_out_accuracy` of data already cut into batches (in a distributed fit, each rank scores its share
    of them and the counts are summed over the ranks)."""
    device = input_device(model)
    positions = accepts(model, "position_ids")

    def count(mine: Callable[[int], bool]) -> torch.Tensor:
        correct = total = 0
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if not mine(i):
                    continue
                kwargs = (
                    {"position_ids": position_ids_from_mask(batch.attention_mask).to(device)}
                    if positions
                    else {}
                )
                out = model(
                    input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device),
                    use_cache=False,
                    **kwargs,
                )
                pred = out.logits[:, :-1].argmax(-1).cpu()
                target = batch.input_ids[:, 1:]
                counted = batch.select[:, 1:] & batch.attention_mask[:, :-1].bool()
                correct += int(((pred == target) & counted).sum())
                total += int(counted.sum())
        return torch.tensor([correct, total], dtype=torch.int64)

    correct, total = sum_sharded(count, "Scoring held-out examples").tolist()
    if total == 0:
        raise ValueError(f"The held-out examples hold no scorable tokens (token mode {mode!r}).")
    return correct / total
