"""Local lm-eval tasks for the tests, written as YAML + JSON Lines (lm-eval reads them offline): a multiple-choice
task, a generation task and a loglikelihood task, each mixing forget items with retain items from the shared data
sets (MMLU rows for multiple choice, MBPP tasks for generation)."""

from __future__ import annotations

import csv
from pathlib import Path

from helpers_data import SHARED_DATA, read_jsonl

from benchmarks.lm_eval_formats import MC_METRICS, write_task


def mmlu_rows(subject: str, n: int, data: Path = SHARED_DATA) -> list[dict]:
    with open(data / "mmlu" / "test" / f"{subject}_test.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    return [
        {
            "question": r["question"],
            "choices": [r[f"choice{i}"] for i in range(4)],
            "answer": int(r["answer"]),
        }
        for r in rows
    ]


def sum_choices(a: int, b: int, gold: int) -> dict:
    """Four numeric choices for ``a + b``, the right one at position ``gold``."""
    wrong = [a + b + 1, a + b - 2, 2 * (a + b)]
    choices = wrong[:gold] + [a + b] + wrong[gold:]
    return {"choices": [str(c) for c in choices], "answer": gold}


def mc_task(
    folder: Path, forget: list[dict], retain: list[dict], name: str = "ul_mc", metrics: str = MC_METRICS
) -> Path:
    """``forget`` / ``retain``: ``{"question", "choices", "answer"}``; the context is the question as given."""
    body = (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\ntarget_delimiter: ' '\n" + metrics
    )
    return write_task(folder, name, forget + retain, body)


def generation_task(folder: Path, forget: list[str], retain: list[str], name: str = "ul_gen") -> Path:
    docs = [{"question": q, "answer": "42"} for q in forget + retain]
    body = (
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 10\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return write_task(folder, name, docs, body)


def loglikelihood_task(folder: Path, forget: list[str], retain: list[str], name: str = "ul_ll") -> Path:
    docs = [{"question": q, "answer": " 42"} for q in forget + retain]
    body = (
        "output_type: loglikelihood\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return write_task(folder, name, docs, body)


def mbpp_texts(n: int, data: Path = SHARED_DATA) -> list[str]:
    """The first ``n`` MBPP test tasks' descriptions (task ids 11..)."""
    rows = [r for r in read_jsonl(data / "mbpp" / "mbpp.jsonl") if 11 <= r["task_id"] <= 510]
    return [r["text"] for r in rows[:n]]


def rolling_task(folder: Path, forget: list[str], retain: list[str], name: str = "ul_rolling") -> Path:
    """Perplexity of whole texts (``loglikelihood_rolling``)."""
    docs = [{"text": t} for t in forget + retain]
    body = (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    return write_task(folder, name, docs, body)
