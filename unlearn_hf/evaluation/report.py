"""Evaluation reports: a JSON document, a Markdown table and a bar chart of skill scores per model/method.

The report is a plain dict (``json.dump``-able)::

    {"baseline": "base", "models": [...], "skills": [...],
     "scores": {model: {skill: float | None}},
     "relative_drop": {model: {skill: float | None}},   # (baseline - model) / baseline, ``docs/METHOD.md`` §7
     "metrics": {model: {skill: MetricResult.to_dict()}},  # when MetricResults were given
     "metadata": {...}}
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .results import MetricResult, relative_drop

logger = logging.getLogger(__name__)


def _value(score: float | MetricResult | None) -> float | None:
    if isinstance(score, MetricResult):
        score = score.score
    if score is None or (isinstance(score, float) and (math.isnan(score) or math.isinf(score))):
        return None
    return float(score)


def build_report(
    scores: Mapping[str, Mapping[str, float | MetricResult | None]],
    baseline: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    relative: bool = True,
) -> dict[str, Any]:
    """Collect scores of several models (the baseline and the unlearned variants) on several skills.

    Args:
        scores: ``{model_or_method: {skill: score or MetricResult}}``.
        baseline: the model the relative drops are measured against (default: the first one).
        metadata: anything JSON-serialisable to keep with the results (model name, settings, timings).
        relative: report relative drops against the baseline; ``False`` for columns that are not a model and its
            variants (one model in several prompt formats): no baseline, no drops.

    Returns:
        The report dict (see the module docstring).
    """
    if not scores:
        raise ValueError("scores is empty: nothing to report.")
    models = list(scores)
    if not relative and baseline is not None:
        raise ValueError(
            f"baseline={baseline!r} with relative=False: a report without drops has no baseline."
        )
    baseline = None if not relative else baseline if baseline is not None else models[0]
    if relative and baseline not in scores:
        raise ValueError(f"Baseline {baseline!r} is not among the models: {models}.")
    skills: list[str] = []
    for per_skill in scores.values():
        skills.extend(s for s in per_skill if s not in skills)
    values = {m: {s: _value(scores[m].get(s)) for s in skills} for m in models}
    drops: dict[str, dict[str, float | None]] = {}
    for m in models if relative else []:
        if m == baseline:
            continue
        drops[m] = {}
        for s in skills:
            before, after = values[baseline][s], values[m][s]
            drops[m][s] = None if before is None or after is None else _value(relative_drop(before, after))
    report: dict[str, Any] = {
        "baseline": baseline,
        "models": models,
        "skills": skills,
        "scores": values,
        "relative_drop": drops,
        "metadata": dict(metadata or {}),
    }
    metrics = {
        m: {s: r.to_dict() for s, r in per_skill.items() if isinstance(r, MetricResult)}
        for m, per_skill in scores.items()
    }
    if any(metrics.values()):
        report["metrics"] = metrics
    return report


def write_json(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")
    return path


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a report written by :func:`write_json`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def markdown_table(report: Mapping[str, Any], digits: int = 3) -> str:
    """Skills × models table; non-baseline cells show the score and the relative drop in percent."""
    models, skills, baseline = report["models"], report["skills"], report["baseline"]

    def cell(model: str, skill: str) -> str:
        score = report["scores"][model].get(skill)
        if score is None:
            return "–"
        text = f"{score:.{digits}f}"
        if baseline is not None and model != baseline:
            drop = report["relative_drop"][model].get(skill)
            text += " (drop n/a)" if drop is None else f" (drop {100 * drop:.1f}%)"
        return text

    header = "| skill | " + " | ".join(f"{m} (baseline)" if m == baseline else m for m in models) + " |"
    rule = "|---|" + "---|" * len(models)
    rows = [f"| {s} | " + " | ".join(cell(m, s) for m in models) + " |" for s in skills]
    return "\n".join([header, rule, *rows]) + "\n"


def plot_report(report: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Grouped bar chart (one group per skill, one bar per model) saved as PNG; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_report needs matplotlib: pip install 'unlearn_hf[plot]'.") from err
    models, skills = report["models"], report["skills"]
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(skills) * max(1, len(models)) / 2), 4.0))
    for k, model in enumerate(models):
        heights = [report["scores"][model].get(s) or 0.0 for s in skills]
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(skills))]
        ax.bar(xs, heights, width=width, label=model)
    ax.set_xticks(range(len(skills)))
    ax.set_xticklabels(skills, rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.set_ylim(
        0, 1.05 * max([1.0] + [v for m in models for v in report["scores"][m].values() if v is not None])
    )
    default = (
        "Skill scores"
        if report["baseline"] is None
        else f"Skill scores: {report['baseline']} (baseline) vs unlearned"
    )
    ax.set_title(title or default)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_report(
    report: Mapping[str, Any], out_dir: str | os.PathLike, stem: str = "report", plot: bool | None = True
) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and (with ``plot``) ``<stem>.png`` into ``out_dir``; ``plot=None``:
    the chart when matplotlib is installed, else a warning (a run is never lost over its chart)."""
    if plot is None:
        plot = importlib.util.find_spec("matplotlib") is not None
        if not plot:
            logger.warning("matplotlib is not installed: no chart (pip install 'unlearn_hf[plot]').")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": write_json(report, out / f"{stem}.json")}
    md = out / f"{stem}.md"
    md.write_text(markdown_table(report), encoding="utf-8")
    paths["markdown"] = md
    if plot:
        paths["png"] = plot_report(report, out / f"{stem}.png")
    logger.info("Report written to %s", out)
    return paths
