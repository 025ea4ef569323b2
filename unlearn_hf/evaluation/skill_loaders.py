"""Per-skill loaders: each turns a skill's local files or Hub rows into its probe and eval items.

The probe/eval splits are those of the table in :mod:`unlearn_hf.evaluation.skills`; orders follow the files
(MMLU round-robin over subjects).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .data_files import (
    DataFileError,
    check_columns,
    hub_rows,
    local_folder,
    read_csv,
    read_json,
    read_jsonl,
    unix_newlines,
)
from .items import EvalItem
from .prompts import mlqa_prompt, qa_prompt
from .skill_specs import SkillSpec

logger = logging.getLogger(__name__)

MBPP_PROBE_IDS = (601, 974)
MBPP_EVAL_IDS = (11, 510)


class SkillSplits(NamedTuple):
    """What a loader returns: the probe and eval items, and (MMLU only) each subject's dev examples."""

    probe: list[EvalItem]
    evals: list[EvalItem]
    dev: dict[str, tuple[EvalItem, ...]]


def _load_gsm8k(spec: SkillSpec, data_dir: Path | None) -> SkillSplits:
    out = []
    for split in ("train", "test"):
        if data_dir is not None:
            path = local_folder(spec, data_dir, [f"{split}.jsonl"]) / f"{split}.jsonl"
            rows, source = read_jsonl(path), str(path)
        else:
            rows, source = hub_rows(spec, split), f"{spec.hub_path}[{split}]"
        check_columns(rows, ("question", "answer"), source, text=("question", "answer"))
        out.append(
            [
                EvalItem(qa_prompt(r["question"]), r["answer"], f"gsm8k/{split}/{i}", question=r["question"])
                for i, r in enumerate(rows)
            ]
        )
    return SkillSplits(out[0], out[1], {})


def _check_mbpp_rows(rows: list[dict[str, Any]], source: str) -> None:
    """Refuse, naming ``source`` and the row, a ``task_id`` that is not an integer and tests that are not text."""
    for i, r in enumerate(rows):
        task = r["task_id"]
        try:
            whole = not isinstance(task, bool) and float(task) == int(task)
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole:
            raise DataFileError(f"{source}: row {i}, task_id {task!r} is not an integer.")
        tests = r["test_list"]
        if not isinstance(tests, str) and not (
            isinstance(tests, Sequence) and all(isinstance(t, str) for t in tests)
        ):
            raise DataFileError(
                f"{source}: row {i} (task {task}), test_list must be a list of text, got {tests!r:.80}."
            )
        setup = r.get("test_setup_code")
        if setup is not None and not isinstance(setup, str):
            raise DataFileError(
                f"{source}: row {i} (task {task}), test_setup_code must be text, got {type(setup).__name__}."
            )


def _mbpp_item(row: Mapping[str, Any], split: str) -> EvalItem:
    tests = row["test_list"]
    tests = [tests] if isinstance(tests, str) else list(tests)
    setup = unix_newlines(row.get("test_setup_code") or "")
    test_code = (setup + "\n" if setup.strip() else "") + "\n".join(unix_newlines(t) for t in tests) + "\n"
    return EvalItem(
        qa_prompt(row["text"]),
        unix_newlines(row["code"]),
        f"mbpp/{split}/{int(row['task_id'])}",
        test_code=test_code,
        question=row["text"],
    )


def _load_mbpp(spec: SkillSpec, data_dir: Path | None) -> SkillSplits:
    needed = ("task_id", "text", "code", "test_list")
    if data_dir is not None:
        path = local_folder(spec, data_dir, ["mbpp.jsonl"]) / "mbpp.jsonl"
        rows = read_jsonl(path)
        check_columns(rows, needed, str(path), text=("text", "code"))
        _check_mbpp_rows(rows, str(path))
        by_split = {"train": rows, "test": rows}
    else:
        by_split = {s: hub_rows(spec, s) for s in ("train", "test")}
        for s, rows in by_split.items():
            check_columns(rows, needed, f"{spec.hub_path}[{s}]", text=("text", "code"))
            _check_mbpp_rows(rows, f"{spec.hub_path}[{s}]")
    out = []
    for split, (lo, hi) in (("train", MBPP_PROBE_IDS), ("test", MBPP_EVAL_IDS)):
        rows = sorted(
            (r for r in by_split[split] if lo <= int(r["task_id"]) <= hi), key=lambda r: int(r["task_id"])
        )
        out.append([_mbpp_item(r, split) for r in rows])
    return SkillSplits(out[0], out[1], {})


#: Where a HumanEval completion leaves the function body (the Codex paper's stop sequences): a top-level line.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def _load_humaneval(spec: SkillSpec, data_dir: Path | None) -> SkillSplits:
    if data_dir is not None:
        path: Path | None = None
        for name in ("HumanEval.jsonl.gz", "HumanEval.jsonl"):
            try:
                path = local_folder(spec, data_dir, [name]) / name
                break
            except FileNotFoundError:
                continue
        if path is None:
            local_folder(spec, data_dir, ["HumanEval.jsonl.gz"])  # raises the standard message
            raise AssertionError
        rows, source = read_jsonl(path), str(path)
    else:
        rows, source = hub_rows(spec, "test"), f"{spec.hub_path}[test]"
    check_columns(
        rows,
        ("task_id", "prompt", "canonical_solution", "test", "entry_point"),
        source,
        text=("prompt", "canonical_solution", "test", "entry_point"),
    )
    items = [
        EvalItem(
            r["prompt"],
            r["canonical_solution"],
            f"humaneval/{r['task_id']}",
            answer_sep="",
            program_prefix=r["prompt"],
            test_code=f"{r['test']}\n\ncheck({r['entry_point']})\n",
            question=r["prompt"],
            stop=HUMANEVAL_STOP,
        )
        for r in rows
    ]
    return SkillSplits(items[1::2], items[0::2], {})


def _mmlu_label(value: Any, source: str) -> int:
    text = str(value).strip()
    if text.upper() in ("A", "B", "C", "D"):
        return "ABCD".index(text.upper())
    try:
        label = int(text)
    except ValueError:
        raise ValueError(f"{source}: answer {value!r} is neither 0-3 nor A-D.") from None
    if not 0 <= label <= 3:
        raise ValueError(f"{source}: answer {value!r} is out of range 0-3.")
    return label


def _mmlu_rows(spec: SkillSpec, data_dir: Path | None, split: str) -> dict[str, list[dict[str, Any]]]:
    """Rows of ``split`` grouped by subject, each with ``question``, ``choices`` (list), ``answer``."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    if data_dir is not None:
        folder = local_folder(spec, data_dir, [split]) / split
        files = sorted(folder.glob(f"*_{split}.csv"))
        if not files:
            raise FileNotFoundError(f"Skill 'mmlu': no *_{split}.csv files in {folder}.")
        for path in files:
            rows = read_csv(path)
            check_columns(rows, ("question", "choice0", "choice1", "choice2", "choice3", "answer"), str(path))
            subject = path.name[: -len(f"_{split}.csv")]
            grouped[subject] = [
                {
                    "question": r["question"],
                    "choices": [r[f"choice{k}"] for k in range(4)],
                    "answer": _mmlu_label(r["answer"], str(path)),
                }
                for r in rows
            ]
    else:
        rows = hub_rows(spec, split)
        source = f"{spec.hub_path}[{split}]"
        check_columns(rows, ("question", "subject", "choices", "answer"), source)
        for r in rows:
            if len(r["choices"]) != 4:
                raise ValueError(
                    f"{source}: expected 4 choices, got {len(r['choices'])}: {r['question'][:60]!r}"
                )
            grouped.setdefault(r["subject"], []).append(
                {
                    "question": r["question"],
                    "choices": list(r["choices"]),
                    "answer": _mmlu_label(r["answer"], source),
                }
            )
    return dict(sorted(grouped.items()))


def _load_mmlu(spec: SkillSpec, data_dir: Path | None) -> SkillSplits:

    def make(r: Mapping[str, Any], subject: str, key: str, shots: tuple[EvalItem, ...] = ()) -> EvalItem:
        choices = tuple(str(c) for c in r["choices"])
        return EvalItem(
            qa_prompt(r["question"]),
            choices[r["answer"]],
            key,
            choices=choices,
            label=r["answer"],
            subject=subject,
            shots=shots,
            question=r["question"] + "".join(f"\n{'ABCD'[j]}. {c}" for j, c in enumerate(choices)),
        )

    dev = _mmlu_rows(spec, data_dir, "dev")
    test = _mmlu_rows(spec, data_dir, "test")
    dev_items = {
        s: tuple(make(r, s, f"mmlu/dev/{s}/{i}") for i, r in enumerate(rows)) for s, rows in dev.items()
    }
    probe_by: dict[str, list[EvalItem]] = {}
    eval_by: dict[str, list[EvalItem]] = {}
    for subject, rows in test.items():
        shots = dev_items.get(subject, ())
        if len(shots) < 5:
            logger.warning("MMLU subject %s has %d dev examples (5 expected).", subject, len(shots))
        items = [make(r, subject, f"mmlu/test/{subject}/{i}", shots) for i, r in enumerate(rows)]
        probe_by[subject], eval_by[subject] = items[1::2], items[0::2]
    return SkillSplits(_round_robin(probe_by), _round_robin(eval_by), dev_items)


def _round_robin(groups: Mapping[str, list[EvalItem]]) -> list[EvalItem]:
    """Interleave groups (one item of each in turn) so that any prefix covers every group."""
    out: list[EvalItem] = []
    longest = max((len(g) for g in groups.values()), default=0)
    for i in range(longest):
        out.extend(g[i] for g in groups.values() if i < len(g))
    return out


def _squad_rows(doc: Any, source: str) -> list[dict[str, Any]]:
    """The questions of a SQuAD-format document (``data`` → articles → ``paragraphs`` → ``qas``) as rows with
    context, question, answer texts and id; a part that is missing or of the wrong kind is named with its path."""

    def part(obj: Any, key: str, where: str, kind: type) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise DataFileError(
                f"{source}: {where or 'the document'} has no {key!r} (not SQuAD-format JSON)."
            )
        if not isinstance(obj[key], kind):
            raise DataFileError(
                f"{source}: {where + '.' if where else ''}{key} must be a {kind.__name__}, got "
                f"{type(obj[key]).__name__}."
            )
        return obj[key]

    if not isinstance(doc, dict) or "data" not in doc:
        raise KeyError(f"{source}: not SQuAD-format JSON (no 'data' key).")
    rows = []
    for a, article in enumerate(part(doc, "data", "", list)):
        for p, para in enumerate(part(article, "paragraphs", f"data[{a}]", list)):
            where = f"data[{a}].paragraphs[{p}]"
            context = part(para, "context", where, str)
            for q, qa in enumerate(part(para, "qas", where, list)):
                at = f"{where}.qas[{q}]"
                answers = part(qa, "answers", at, list)
                rows.append(
                    {
                        "context": context,
                        "question": part(qa, "question", at, str),
                        "answers": [
                            part(x, "text", f"{at}.answers[{i}]", object) for i, x in enumerate(answers)
                        ],
                        "id": part(qa, "id", at, object),
                    }
                )
    return rows


def _load_mlqa(spec: SkillSpec, data_dir: Path | None) -> SkillSplits:
    lang = spec.name.split("-", 1)[1]
    rows: list[dict[str, Any]] = []
    if data_dir is not None:
        name = f"dev-context-{lang}-question-{lang}.json"
        path = local_folder(spec, data_dir, [name]) / name
        source = str(path)
        rows = _squad_rows(read_json(path), source)
    else:
        source = f"{spec.hub_path}[{spec.hub_config}, validation]"
        for r in hub_rows(spec, "validation"):
            answers = r.get("answers")
            rows.append(
                {**r, "answers": answers.get("text", []) if isinstance(answers, Mapping) else answers}
            )
    check_columns(rows, ("context", "question", "answers", "id"), source, text=("context", "question"))
    groups: dict[str, int] = {}
    probe: list[EvalItem] = []
    evals: list[EvalItem] = []
    for r in rows:
        if not r["answers"]:
            raise ValueError(f"{source}: question {r['id']} has no answer.")
        if not isinstance(r["answers"], list) or not all(
            isinstance(a, str) and a.strip() for a in r["answers"]
        ):
            raise ValueError(
                f"{source}: question {r['id']} has an answer that is not text or is empty: {r['answers']!r}."
            )
        group = groups.setdefault(r["context"], len(groups))
        item = EvalItem(
            mlqa_prompt(r["context"], r["question"]),
            r["answers"][0],
            f"mlqa-{lang}/dev/{r['id']}",
            question=f"Context: {r['context']}\nQuestion: {r['question']}",
        )
        (evals if group % 2 == 0 else probe).append(item)
    return SkillSplits(probe, evals, {})


LOADERS: dict[str, Callable[[SkillSpec, Path | None], SkillSplits]] = {
    "gsm8k": _load_gsm8k,
    "mbpp": _load_mbpp,
    "humaneval": _load_humaneval,
    "mmlu": _load_mmlu,
    "mlqa": _load_mlqa,
}
"""Loader of each skill family (the part of the skill name before ``-``)."""
