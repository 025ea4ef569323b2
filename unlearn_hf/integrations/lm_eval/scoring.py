"""How lm-eval scores the documents of a model that abstains: an abstained document is scored wrong, and every
document reports the ``abstained`` metric (its mean is the task's abstention rate).

lm-eval's tasks never see the model, only its responses. Right before a task scores its documents it applies its
filters (``Task.apply_filters``); there, :func:`install_scoring`'s wrapper reads the responses that
:class:`~.model.UnlearnedLM` returned (:mod:`.results`, kept unfiltered on each ``Instance``) and, when they come
from it, gives this task object its own ``process_results`` that:

- marks a document abstained when any of its requests abstained;
- ``multiple_choice``: scores an abstained document as choosing a wrong answer: the first choice that is not a
  gold answer (read as lm-eval reads it) gets log-probability 0, every other choice ``-inf``, so every metric the
  task computes from the prediction (``acc``, ``acc_norm``, ``acc_bytes``, ``f1``, ``mcc``, ...) sees a wrong
  answer (without this, lm-eval's ``argmax`` over all ``-inf`` would pick choice 0 and count the refusal correct
  whenever the gold answer is the first);
- ``loglikelihood`` / ``loglikelihood_rolling``: scores ``-inf`` (perplexities become infinite, ``acc`` 0);
- ``generate_until``: the response is the refusal text, scored by the task's own metric;
- adds ``abstained`` (1.0 / 0.0, aggregated by mean, lower is better); a group of tasks reports the share of
  all its documents abstained on.

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
_PREVIOUS = "_unlearn_hf_previous_process_results"


def install_scoring() -> None:
    """Wrap ``apply_filters`` of lm-eval's task classes and ``aggregate`` of its groups (once per process; a no-op
    for other models' tasks)."""
    from lm_eval.api.group import Group
    from lm_eval.api.task import ConfigurableTask, Task

    for cls, name, after in (
        (Task, "apply_filters", filters_applied),
        (ConfigurableTask, "apply_filters", filters_applied),
        (Group, "aggregate", group_abstention),
    ):
        original = cls.__dict__.get(name)
        if original is None or getattr(original, _MARK, False):
            continue

        @functools.wraps(original)
        def wrapper(
            self: Any, *args: Any, _original: Any = original, _after: Any = after, **kwargs: Any
        ) -> Any:
            return _after(self, _original(self, *args, **kwargs), *args, **kwargs)

        setattr(wrapper, _MARK, True)
        setattr(cls, name, wrapper)


def filters_applied(task: Any, out: Any) -> Any:
    """After a task applied its filters, right before it scores its documents."""
    prepare_task(task)
    return out


def group_abstention(group: Any, metrics: dict[str, Any], task_metrics: dict[str, Any]) -> dict[str, Any]:
    """A group's ``abstained``: the share of its leaf tasks' documents abstained on (size-weighted), whatever the
    group's ``aggregate_metric_list`` names."""
    leaves = [t.task_name for t in group.get_all_tasks()]
    found = [task_metrics[n] for n in leaves if n in task_metrics]
    keys = sorted({k for m in found for k in m if k.startswith(ABSTAINED + ",")})
    for key in keys:
        pairs = [(m[key], m.get("sample_len", 0)) for m in found if key in m]
        total = sum(size for _, size in pairs)
        if total:
            metrics[key] = sum(value * size for value, size in pairs) / total
            metrics[key.replace(",", "_stderr,", 1)] = "N/A"
    return metrics


def doc_key(doc: Any) -> str:
    """A document's identity by content (lm-eval re-reads documents from its dataset when it scores them)."""
    text = json.dumps(doc, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prepare_task(task: Any) -> None:
    """Give ``task`` the abstention-aware ``process_results`` when its responses come from an unlearn_hf model;
    otherwise take back what an earlier evaluation of the same task object gave it."""
    own = task.__dict__.get("process_results")
    if isinstance(own, functools.partial) and own.func is score_document:
        task.__dict__.pop("process_results")
        previous = task.__dict__.pop(_PREVIOUS, None)
        if previous is not None:  # the task's own instance-level scorer, which ours wrapped
            task.process_results = previous
    for key in task.__dict__.pop(_MARK, ()):  # the metric entries an earlier evaluation added
        for table in ("_aggregation_list", "_higher_is_better"):
            getattr(task, table, {}).pop(key, None)
    flags: dict[str, bool] = {}
    keys: dict[int, str] = {}  # the requests of one document share its object: hash it once
    for instance in task.instances or []:
        seen = [a for a in map(abstained_of, instance.resps) if a is not None]
        if seen:
            if id(instance.doc) not in keys:
                keys[id(instance.doc)] = doc_key(instance.doc)
            key = keys[id(instance.doc)]
            flags[key] = flags.get(key, False) or any(seen)
    if not flags:
        return
    from lm_eval.api.metrics import mean

    added = []
    for table, value in (("_aggregation_list", mean), ("_higher_is_better", False)):
        entries = getattr(task, table, None)
        if isinstance(entries, dict) and ABSTAINED not in entries:
            entries[ABSTAINED] = value
            added.append(ABSTAINED)
    setattr(task, _MARK, tuple(set(added)))
    setattr(task, _PREVIOUS, task.__dict__.get("process_results"))
    task.process_results = functools.partial(score_document, task, task.process_results, flags)


def score_document(task: Any, original: Any, flags: dict[str, bool], doc: Any, results: list[Any]) -> dict:
    """The task's metrics of one document, an abstained one scored wrong, plus ``abstained``. The document's
    decision is found by its content, or read from its (unfiltered) responses."""
    marks = [abstained_of(r) for resp in results for r in (resp if isinstance(resp, list) else [resp])]
    abstained = flags.get(doc_key(doc), False) or any(marks)
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


def gold_indices(task: Any, doc: Any, n_choices: int) -> set[int] | None:
    """The indices of a multiple-choice document's gold answers, compared as lm-eval's ``process_results``
    compares them (an index of any integer type, a list of them, or a choice's text; ``multiple_input`` tasks
    keep it in the text); ``None`` when the task cannot say."""
    try:
        choices = list(task.doc_to_choice(doc))
        gold = task.doc_to_text(doc) if getattr(task, "multiple_input", False) else task.doc_to_target(doc)
    except Exception:  # a task of its own kind: no gold to read
        return None
    out = set()
    for g in gold if isinstance(gold, list) else [gold]:
        if isinstance(g, str):
            out.update(j for j in range(n_choices) if j < len(choices) and choices[j] == g)
        else:
            out.update(j for j in range(n_choices) if _equals(g, j))
    return out or None


def _equals(value: Any, index: int) -> bool:
    try:
        return bool(value == index)
    except Exception:  # an array or an object without a plain comparison
        return False


def wrong_choice(original: Any, doc: Any, results: list[Any], task: Any) -> list[Any]:
    """Multiple-choice responses that pick the first choice that is not a gold answer (log-probability 0, the
    others ``-inf``), checked against the task's own accuracies; where the gold cannot be read (or the task scores
    in its own way), the first choice those accuracies score 0.

    With ``acc_mutual_info`` lm-eval appends one unconditional request per choice; those keep their values."""
    n = len(results)
    if "acc_mutual_info" in (getattr(task, "_metric_fn_list", None) or {}):
        n //= 2

    def pick(j: int) -> list[Any]:
        return [(0.0 if i == j else -math.inf, False) for i in range(n)] + list(results[n:])

    def scored_wrong(j: int) -> bool:
        metrics = original(doc, pick(j))
        return not any(_positive(metrics.get(name)) for name in ACCURACIES)

    gold = gold_indices(task, doc, n) or set()
    order = [j for j in range(n) if j not in gold] + sorted(gold)
    for j in order:
        if scored_wrong(j):
            return pick(j)
    return pick(order[0])  # no choice is scored wrong (e.g. every choice is gold)


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


#: lm-eval's per-document multiple-choice accuracies (1 when the prediction is a gold answer).
ACCURACIES = ("acc", "acc_norm", "acc_bytes", "acc_mutual_info", "exact_match")
