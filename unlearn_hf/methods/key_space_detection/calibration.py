"""Calibration: choosing the layer(s), trailing window and α of Key Space Detection on held-out data.

Input: for every held-out forget query and every retain query (each rendering a row), the *scaled distance* of
the key at each trailing position to each candidate layer's hypercube, ``z = max_d |v_d − μ_d| / σ_d / k``
(``[rows, layers, window]``, from :mod:`.distances`). A row is inside at α when ``z ≤ α``. With a window of
``w`` tokens a row's score at a layer is the minimum of ``z`` over its last ``w`` positions; with several layers
the scores combine by the rule (``"all"``: maximum, ``"any"``: minimum). Everything below is a function of these
scores: no candidate probes the model again.

**The candidates.** Each candidate layer on its own and, up to ``max_layers``, every combination of candidate layers
of one key width under the config's rule (``"all"``: inside at every layer of the set). A combination reads several
views of the same question.

**The choice.** For each candidate (layer set, window) the *limit* is the smallest α at which the false abstention
of some retain group (a retain set in one rendering) would exceed :data:`LIMIT_SHARE` of ``max_false_rate``, found
exactly from the sorted scores. Of the candidates that then abstain on (within ``forget_tolerance`` of) the largest
share of held-out forget queries in their *worst* rendering, and then (within the same tolerance) on the largest
mean share over renderings, the one with the widest margin between the α that
reaches its share and the limit wins: several layers often separate the calibration data perfectly, and the widest
margin is the least sensitive to retain queries unlike the calibration data. α is set :data:`ALPHA_POSITION` of the
way from the smallest value that reaches that share to the limit. Both leave room for retain queries that no
calibration question resembles, which the budget cannot see. (A fixed α is only checked against the whole budget.)
With fewer than ``1 / (LIMIT_SHARE · max_false_rate)`` retain questions in a group (100 at the default 0.02), not
one of them may abstain.

Measured on SmolLM2 (README, "Key Space Detection however the question is asked"; 160-200 GSM8K questions, 60-100
MBPP and MMLU calibration questions per rendering): the best-margin single layer abstained on 89% of held-out GSM8K
questions in the QA template and bare, or, with the smaller calibration, on 23% of MLQA-en questions; pairs under
``"all"`` with the limit at half the budget and α a third of the way abstained on 95-99% of them in every rendering
and wording at 0-1.7% false abstention on every retain set. Those rules were chosen on those measurements (the same
held-out sets), so they are not independent evidence that they generalise; on the next 100 questions of each set
and four wordings written afterwards, GSM8K abstention was 97-100% and false abstention 0-1%, except MLQA-en, unlike
every calibration question: up to 3%.

``window="auto"`` takes the widest window whose worst-rendering (and mean) forget share is within
``window_tolerance`` of the best: the held-out queries come in the fitted renderings, and a wider window also covers closing tokens no
rendering showed (an unseen wording), at a false-abstention cost the budget still bounds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

#: Share of ``max_false_rate`` that calibration may spend on its own retain queries (the rest is room for others).
LIMIT_SHARE = 0.5
#: Where α sits between the α that reaches the chosen forget share (0) and the limit (1).
ALPHA_POSITION = 1 / 3

#: α grid of the saved calibration table (forget and false abstention per layer and α).
ALPHA_GRID = torch.logspace(math.log10(0.25), math.log10(4.0), 49, dtype=torch.float64)


class CalibrationError(ValueError):
    """The calibration data cannot meet the false-abstention budget."""


@dataclass(frozen=True)
class Calibration:
    """The calibrated choice and the rates it was chosen on.

    Attributes:
        layers: the chosen layers. window: the chosen window. alpha: the chosen α.
        forget_rate: held-out forget abstention per rendering, at the choice.
        false_rate: retain abstention per retain group, at the choice.
        table_layers / table_forget / table_false: for each single candidate layer at the chosen window, mean
            forget abstention and worst-group false abstention at every α of :data:`ALPHA_GRID` (``[L, A]``).
    """

    layers: list[int]
    window: int
    alpha: float
    forget_rate: dict[str, float]
    false_rate: dict[str, float]
    table_layers: torch.Tensor
    table_forget: torch.Tensor
    table_false: torch.Tensor


def window_scores(z: torch.Tensor, columns: Sequence[int], window: int, rule: str) -> torch.Tensor:
    """Per-row scores ``[rows]`` of ``z`` ``[rows, layers, W]`` at the layer ``columns`` with a ``window``."""
    return _combine(z[:, :, :window].amin(-1), columns, rule)


def _combine(per_layer: torch.Tensor, columns: Sequence[int], rule: str) -> torch.Tensor:
    """Per-row scores ``[rows]`` from window scores ``[rows, layers]`` at the layer ``columns``."""
    if len(columns) == 1:
        return per_layer[:, columns[0]]
    chosen = per_layer[:, torch.tensor(list(columns))]
    return chosen.amax(1) if rule == "all" else chosen.amin(1)


class _Groups:
    """The rows of each group (a rendering; a retain set × rendering), groups in first-seen order, indexed once:
    every candidate's rates are then a ``bincount`` (calibration scores hundreds of candidates)."""

    def __init__(self, groups: Sequence[str]) -> None:
        self.names = list(dict.fromkeys(groups))
        index = {g: i for i, g in enumerate(self.names)}
        self.ids = torch.tensor([index[g] for g in groups], dtype=torch.long)
        self.masks = [self.ids == i for i in range(len(self.names))]
        self.sizes = torch.bincount(self.ids, minlength=len(self.names)).double()

    def rates(self, scores: torch.Tensor, alpha: float) -> dict[str, float]:
        """Share of each group's rows with a score ≤ ``alpha``."""
        inside = torch.bincount(self.ids[scores <= alpha], minlength=len(self.names)).double() / self.sizes
        return dict(zip(self.names, inside.tolist()))


def allowed_false(rate: float, n: int) -> int:
    """How many of ``n`` retain questions may abstain within a false-abstention ``rate``."""
    return math.floor(rate * n + 1e-9)


def budget_limit(scores: torch.Tensor, groups: _Groups, max_false_rate: float) -> float:
    """The supremum of α keeping every group's false abstention ≤ ``max_false_rate``: α must stay below it."""
    limit = math.inf
    for mask in groups.masks:
        s = torch.sort(scores[mask]).values
        allowed = allowed_false(max_false_rate, s.numel())
        if allowed < s.numel():
            limit = min(limit, float(s[allowed]))
    return limit


class _Candidate(NamedTuple):
    """One (layer set, window) that meets the budget: its worst-rendering and mean forget share, its margin (the
    budget's limit over the α that reaches its share; 0 for a fixed α), its α and its rates."""

    worst: float
    mean: float
    margin: float
    alpha: float
    forget: dict[str, float]
    false: dict[str, float]
    layers: list[int]
    window: int


def _evaluate(sf, f_groups, sr, r_groups, budget, alpha, layers, window) -> _Candidate | None:
    """The candidate ``layers`` at ``window`` (scores ``sf``/``sr``), ``None`` when it cannot meet the budget."""
    if alpha is None:
        limit = budget_limit(sr, r_groups, budget * LIMIT_SHARE)
        caught = sf[sf < limit]
        if caught.numel() == 0:
            return None
        reach = float(caught.max())
        alpha = reach * 1.25 if math.isinf(limit) else reach + (limit - reach) * ALPHA_POSITION
        margin = math.inf if math.isinf(limit) else limit / max(reach, 1e-12)
    else:
        margin = 0.0
    forget = f_groups.rates(sf, alpha)
    false = r_groups.rates(sr, alpha)
    if max(false.values()) > budget + 1e-12:
        return None
    mean = sum(forget.values()) / len(forget)
    return _Candidate(min(forget.values()), mean, margin, alpha, forget, false, layers, window)


def calibrate(
    forget_z: torch.Tensor,
    forget_groups: Sequence[str],
    retain_z: torch.Tensor,
    retain_groups: Sequence[str],
    *,
    layer_ids: Sequence[int],
    windows: Sequence[int],
    max_false_rate: float,
    layers: Sequence[int] | None = None,
    alpha: float | None = None,
    rule: str = "all",
    max_layers: int = 1,
    widths: Sequence[int] | None = None,
    window_tolerance: float = 0.01,
    forget_tolerance: float = 0.05,
) -> Calibration:
    """Choose layers, window and α (see the module docstring).

    Args:
        forget_z / retain_z: scaled distances ``[rows, len(layer_ids), max(windows)]``.
        forget_groups / retain_groups: the group (rendering; retain set × rendering) of each row.
        layer_ids: the model layer of each column of ``z``.
        windows: candidate windows, narrowest first; a single one fixes the window.
        layers: fixed layers (``None``: each candidate layer on its own, and combinations of them, are candidates).
        alpha: a fixed α (``None``: calibrated).
        rule: how the layers of a set combine (``"all"``: the largest score, ``"any"``: the smallest).
        max_layers: the largest set of layers tried together (1: each layer alone). The candidates grow as
            ``len(layer_ids) ** max_layers``: pairs of 30 layers take well under a second, triples of 80 minutes.
        widths: the key width of each layer of ``layer_ids``; only layers of one width combine (``None``: all).
        window_tolerance: how much worst-rendering (and mean) forget share a wider window may cost.
        forget_tolerance: candidates within this share of the best worst-rendering forget share, and of the
            best mean share among those, compete on their margin (the ratio of the budget's limit to the α that
            reaches their share).

    Raises:
        CalibrationError: no candidate abstains on any held-out forget query within the budget (a calibrated α:
            within ``LIMIT_SHARE`` of it); the message gives the best achievable rates.
    """
    col = {layer: j for j, layer in enumerate(layer_ids)}
    sets = [list(layers)] if layers is not None else layer_sets(layer_ids, max_layers, widths)
    forget_groups, retain_groups = _Groups(forget_groups), _Groups(retain_groups)
    results = {}
    for w in windows:
        forget_w, retain_w = forget_z[:, :, :w].amin(-1), retain_z[:, :, :w].amin(-1)  # [rows, layers]
        feasible = []
        for s in sets:
            sf, sr = (
                _combine(forget_w, [col[i] for i in s], rule),
                _combine(retain_w, [col[i] for i in s], rule),
            )
            c = _evaluate(sf, forget_groups, sr, retain_groups, max_false_rate, alpha, s, w)
            if c is not None:
                feasible.append(c)
        if feasible:
            # among the candidates that forget (nearly) as much as the best, the widest gap between forget and
            # retain scores: it is the choice least sensitive to queries unlike the calibration data
            near = _near_best(feasible, forget_tolerance)
            results[w] = max(near, key=lambda c: (c.margin, c.worst, c.mean))
    if not results:
        used = max_false_rate * (LIMIT_SHARE if alpha is None else 1.0)
        raise CalibrationError(
            _infeasible(forget_z, retain_z, retain_groups, sets, col, windows, rule, max_false_rate, used)
        )
    window = max(c.window for c in _near_best(list(results.values()), window_tolerance))
    best = results[window]
    table = _table(forget_z, retain_z, retain_groups, window)
    return Calibration(
        sorted(best.layers),
        window,
        float(best.alpha),
        best.forget,
        best.false,
        torch.tensor(list(layer_ids)),
        *table,
    )


def _near_best(candidates: list[_Candidate], tolerance: float) -> list[_Candidate]:
    """The candidates within ``tolerance`` of the best worst-rendering forget share and, among those, of the best
    mean: when some rendering is caught by no candidate (every worst share 0), the mean still rules out a set that
    catches almost nothing."""
    worst = max(c.worst for c in candidates)
    candidates = [c for c in candidates if c.worst >= worst - tolerance]
    mean = max(c.mean for c in candidates)
    return [c for c in candidates if c.mean >= mean - tolerance]


def layer_sets(
    layer_ids: Sequence[int], max_layers: int, widths: Sequence[int] | None = None
) -> list[list[int]]:
    """The candidate layer sets: every layer alone, then every combination of up to ``max_layers`` layers of one
    width (``widths[j]``: the key width of ``layer_ids[j]``), in increasing order."""
    widths = [0] * len(layer_ids) if widths is None else list(widths)
    if len(widths) != len(layer_ids):
        raise ValueError(f"Expected {len(layer_ids)} widths, got {len(widths)}.")
    by_width: dict[int, list[int]] = {}
    for layer, width in zip(layer_ids, widths):
        by_width.setdefault(width, []).append(layer)
    sets = [[layer] for layer in layer_ids]
    for n in range(2, max_layers + 1):
        for same in by_width.values():
            sets += [list(c) for c in itertools.combinations(same, n)]
    return sets


def _table(forget_z, retain_z, retain_groups, window) -> tuple[torch.Tensor, torch.Tensor]:
    sf = forget_z[:, :, :window].amin(-1).double()  # [rows, L]
    sr = retain_z[:, :, :window].amin(-1).double()
    grid = ALPHA_GRID.view(1, 1, -1)
    forget = (sf.unsqueeze(-1) <= grid).double().mean(0)  # [L, A]
    false = torch.zeros_like(forget)
    for sel in retain_groups.masks:
        false = torch.maximum(false, (sr[sel].unsqueeze(-1) <= grid).double().mean(0))
    return forget, false


def _infeasible(forget_z, retain_z, retain_groups, sets, col, windows, rule, budget, used) -> str:
    """The message of a calibration that cannot meet the budget: the best rates any candidate reaches."""
    best = None
    for w in windows:
        for s in sets:
            cols = [col[i] for i in s]
            sf = window_scores(forget_z, cols, w, rule)
            sr = window_scores(retain_z, cols, w, rule)
            finite = sf[torch.isfinite(sf)].double()  # inf: a query none of whose experts has a hypercube
            if finite.numel() == 0:
                continue
            a = float(torch.quantile(finite, 0.5))  # the α that abstains on half the forget queries it can
            false = max(retain_groups.rates(sr, a).values())
            if best is None or false < best[0]:
                best = (false, s, w, float((sf <= a).double().mean()))
    if best is None:
        return (
            f"The calibration data cannot meet the false-abstention budget {budget:.3f}: no held-out forget query "
            "has a finite score at any candidate layer (no expert that its tokens reach has a hypercube). Give more "
            "forget questions or set layers."
        )
    false, s, w, caught = best
    smallest = int(retain_groups.sizes.min())
    allowed = allowed_false(used, smallest)
    share = (
        ""
        if used == budget
        else f" ({LIMIT_SHARE:.0%} of the budget: the rest is room for retain queries unlike them)"
    )
    return (
        f"The calibration data cannot meet the false-abstention budget {budget:.3f}: no layer, window and α "
        f"abstains on any held-out forget query while the calibration's own retain questions stay within "
        f"{used:.3f}{share} in every retain group (at most {allowed} of the {smallest} questions of the smallest "
        f"group). Best achievable: at layers {s}, window {w}, abstaining on {caught:.0%} of the held-out forget queries "
        f"abstains on {false:.1%} of the retain queries of the worst retain group. Raise max_false_rate, give more "
        "retain or forget data, or set layers/alpha."
    )
