"""Running lm-eval on a model in memory: what ``unlearn-hf evaluate --harness lm-eval`` calls."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ...context import is_unlearned_model

#: Task names ending so are YAML files (lm-eval loads them by path).
YAML_SUFFIXES = (".yaml", ".yml")

#: ``unlearn-hf evaluate --formats`` names, as lm-eval's ``apply_chat_template``.
CHAT_TEMPLATE = {"qa": False, "chat": True}


class TaskLoadError(ValueError):
    """lm-eval could not load the tasks asked for (unknown name, missing or malformed YAML)."""


def checked_task_manager(include_defaults: bool) -> Any:
    """lm-eval's ``TaskManager``, whose loading errors become :class:`TaskLoadError` (only those: errors of the
    evaluation itself keep their own type)."""
    import yaml
    from lm_eval.tasks import TaskManager

    class CheckedTaskManager(TaskManager):
        def load(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().load(*args, **kwargs)
            except (KeyError, ValueError, TypeError, OSError, yaml.YAMLError) as err:
                text = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
                raise TaskLoadError(f"{type(err).__name__}: {text}") from err

    return CheckedTaskManager(include_defaults=include_defaults)


def task_manager_for(tasks: list[str]) -> Any:
    """A task manager for ``tasks`` (registered task, group or tag names, and task files) once every name is one
    lm-eval registered: called before a model is loaded, so that a misspelt name costs no model load. A task file
    is a path that exists or ends in .yaml / .yml.

    Raises:
        TaskLoadError: naming the tasks that are none of these (a glob pattern included: lm-eval's evaluation does
            not expand it).
    """
    names = [t for t in tasks if not t.endswith(YAML_SUFFIXES) and not Path(t).expanduser().is_file()]
    # lm-eval's own task index takes seconds to build: skipped when every task is a file
    manager = checked_task_manager(include_defaults=bool(names))
    known = set(manager.all_tasks) if names else set()
    unknown = [t for t in names if t not in known]
    if unknown:
        raise TaskLoadError(
            f"lm-eval has no task named {', '.join(unknown)} (`lm-eval ls tasks` lists them; name tasks one by one, "
            "without glob patterns; a task file must exist)"
        )
    return manager


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
    task_manager: Any = None,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` results for ``model`` on ``tasks`` (registered names or YAML paths).

    An unlearned model runs as :class:`~.model.UnlearnedLM` (abstention decided per request, reported as the
    ``abstained`` metric), a plain model as lm-eval's ``HFLM``. ``prompt_format="chat"`` renders every request
    through the tokenizer's chat template (lm-eval's ``apply_chat_template=True``).

    Raises:
        TaskLoadError: lm-eval cannot load ``tasks``.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from .model import UnlearnedLM

    if prompt_format not in CHAT_TEMPLATE:
        raise ValueError(f"Unknown prompt format {prompt_format!r}; choose from {', '.join(CHAT_TEMPLATE)}.")
    if not tasks:
        raise ValueError("No lm-eval tasks given.")
    if task_manager is None:
        task_manager = task_manager_for(tasks)
    lm_class = UnlearnedLM if is_unlearned_model(model) else HFLM
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=task_manager,
            num_fewshot=num_fewshot,
            limit=limit,
            apply_chat_template=CHAT_TEMPLATE[prompt_format],
            log_samples=log_samples,
            bootstrap_iters=0,
        )
    except ValueError as err:  # lm-eval's few-shot sampler, when a task has fewer documents than asked
        if "Sample larger than population" not in str(err):
            raise
        raise TaskLoadError(
            f"num_fewshot={num_fewshot} asks for more few-shot documents than a task has"
        ) from err
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
