"""Running lm-eval on a model in memory: what ``unlearn-hf evaluate --harness lm-eval`` calls."""

from __future__ import annotations

import math
from typing import Any

from ...context import is_unlearned_model

#: ``unlearn-hf evaluate --formats`` names, as lm-eval's ``apply_chat_template``.
CHAT_TEMPLATE = {"qa": False, "chat": True}


def evaluate_with_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    prompt_format: str = "qa",
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` results for ``model`` on ``tasks`` (registered names or YAML paths).

    An unlearned model runs as :class:`~.model.UnlearnedLM` (abstention decided per request, reported as the
    ``abstained`` metric), a plain model as lm-eval's ``HFLM``. ``prompt_format="chat"`` renders every request
    through the tokenizer's chat template (lm-eval's ``apply_chat_template=True``)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from .model import UnlearnedLM

    if prompt_format not in CHAT_TEMPLATE:
        raise ValueError(f"Unknown prompt format {prompt_format!r}; choose from {', '.join(CHAT_TEMPLATE)}.")
    if not tasks:
        raise ValueError("No lm-eval tasks given.")
    lm_class = UnlearnedLM if is_unlearned_model(model) else HFLM
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        # lm-eval's own task index takes seconds to build: skip it when every task is a YAML file
        task_manager=TaskManager(include_defaults=not all(t.endswith((".yaml", ".yml")) for t in tasks)),
        num_fewshot=num_fewshot,
        limit=limit,
        apply_chat_template=CHAT_TEMPLATE[prompt_format],
        log_samples=log_samples,
        bootstrap_iters=0,
    )
    if results is None:  # only on other ranks of a distributed run
        raise RuntimeError("lm-eval returned no results.")
    return results


def summary(results: dict[str, Any]) -> dict[str, float | None]:
    """``{"<task> <metric>": value}`` from lm-eval's results (a filter other than ``none`` is named in brackets;
    stderr entries are left out, non-finite values are ``None``)."""
    out: dict[str, float | None] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            label = f"{task} {metric}" + ("" if filt == "none" else f" [{filt}]")
            out[label] = float(value) if math.isfinite(value) else None
    return out
