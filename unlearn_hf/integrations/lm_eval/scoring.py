"""How lm-eval scores the documents of a model that abstains: an abstained document is scored wrong, and every
document reports the ``abstained`` metric (its mean is the task's abstention rate).

lm-eval's tasks never see the model, only its responses. Right before a task scores its documents it applies its
filters (``Task.apply_filters``); there, :func:`install_scoring`'s wrapper reads the responses that
:class:`~.model.UnlearnedLM` returned (:mod:`.results`, kept unfiltered on each ``Instance``) and, when they come
from it, gives this task object its own ``process_results`` that:

- marks a document abstained when any of its requests abstained;
- ``multiple_choice``: scores an abstained document as choosing a wrong answer: the first choice that the task's
  own ``process_results`` scores as not correct gets log-probability 0, every other choice ``-inf`` (without this,
  lm-eval's ``argmax`` over all ``-inf`` would pick choice 0 and count the refusal correct whenever the gold answer
  is the first);
- ``loglikelihood`` / ``loglikelihood_rolling``: scores ``-inf`` (perplexities become infinite, ``acc`` 0);
- ``generate_until``: the response is the refusal text, scored by the task's own metric;
- adds ``abstained`` (1.0 / 0.0, aggregated by mean, lower is better).

Tasks whose responses come from any other model are left exactly as lm-eval scores them. A document is recognised
by its content (two identical documents in one task share one decision: abstained if either was).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from typing import Any

from .results import abstained_of

#: The per-document metric, and the task-level abstention rate (its mean).
ABSTAINED = "abstained"
_MARK = "_unlearn_hf_scoring"


def install_scoring() -> None:
    """Wrap ``apply_filters`` of lm-eval's task classes (once per process; a no-op for other models' tasks)."""
    from lm_eval.api.task import ConfigurableTask, Task

    for cls in (Task, ConfigurableTask):
        original = cls.__dict__.get("apply_filters")
        if original is None or getattr(original, _MARK, False):
            continue

        @functools.wraps(original)
        def apply_filters(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            out = _original(self, *args, **kwargs)
            prepare_task(self)
            return out

        setattr(apply_filters, _MARK, True)
        cls.apply_filters = apply_filters


def doc_key(doc: Any) -> str:
    """A document's identity by content (lm-eval re-reads documents from its dataset when it scores them)."""
    text = json.dumps(doc, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prepare_task(task: Any) -> None:
    """Give ``task`` the abstention-aware ``process_results`` when its responses come from an unlearn_hf model
    (and take back one given in an earlier evaluation otherwise)."""
    task.__dict__.pop("process_results", None)
    flags: dict[str, bool] = {}
    for instance in task.instances or []:
        seen = [a for a in map(abstained_of, instance.resps) if a is not None]
        if seen:
            key = doc_key(instance.doc)
            flags[key] = flags.get(key, False) or any(seen)
    if not flags:
        return
    from lm_eval.api.metrics import mean

    if isinstance(getattr(task, "_aggregation_list", None), dict):
        task._aggregation_list.setdefault(ABSTAINED, mean)
    if isinstance(getattr(task, "_higher_is_better", None), dict):
        task._higher_is_better.setdefault(ABSTAINED, False)
    task.process_results = functools.partial(score_document, task, task.process_results, flags)


def score_document(task: Any, original: Any, flags: dict[str, bool], doc: Any, results: list[Any]) -> dict:
    """The task's metrics of one document, an abstained one scored wrong, plus ``abstained``."""
    abstained = flags.get(doc_key(doc), False)
    if abstained:
        results = wrong_results(getattr(task, "OUTPUT_TYPE", None), original, doc, list(results), task)
    metrics = dict(original(doc, results))
    metrics[ABSTAINED] = float(abstained)
    return metrics


def wrong_results(
    output_type: str | None, original: Any, doc: Any, results: list[Any], task: Any
) -> list[Any]:
    """The responses an abstained document is scored from (see the module docstring)."""
    if output_type == "multiple_choice":
        return wrong_choice(original, doc, results, task)
    if output_type == "loglikelihood":
        return [(-math.inf, False) for _ in results]
    if output_type == "loglikelihood_rolling":
        return [-math.inf for _ in results]
    return results


def wrong_choice(original: Any, doc: Any, results: list[Any], task: Any) -> list[Any]:
    """Multiple-choice responses that pick the first choice the task scores as not correct.

    With ``acc_mutual_info`` lm-eval appends one unconditional request per choice; those keep their values."""
    n = len(results)
    if "acc_mutual_info" in (getattr(task, "_metric_fn_list", None) or {}):
        n //= 2
    trial = results
    for j in range(n):
        trial = [(0.0 if i == j else -math.inf, False) for i in range(n)] + list(results[n:])
        if not counts_correct(original(doc, trial)):
            return trial
    return trial  # every choice is a gold answer: no wrong one exists


def counts_correct(metrics: dict[str, Any]) -> bool:
    """Whether a document's metrics count its prediction correct: an accuracy above 0, or a ``(gold, pred)``
    pair (``f1``, ``mcc``) that agrees."""
    for name in ("acc", "acc_norm", "acc_mutual_info", "exact_match"):
        if name in metrics and float(metrics[name]) > 0:
            return True
    return any(isinstance(v, tuple) and len(v) == 2 and v[0] == v[1] for v in metrics.values())
