"""Skill data sets: probe texts/queries for fitting and held-out evaluation items, local or from the Hub.

Every skill reads either a local folder laid out like the project's ``shared/data/<name>`` copies (``data_dir``
may be the folder of all skills or the skill's own folder) or, with ``data_dir=None``, the Hugging Face Hub
through ``datasets.load_dataset``. Probing and evaluation use disjoint parts:

| skill | probe (fit) | eval |
|---|---|---|
| ``gsm8k`` | train (7,473) | test (1,319) |
| ``mbpp`` | train, task_id 601-974 | test, task_id 11-510 |
| ``humaneval`` | odd positions | even positions |
| ``mmlu`` | odd rows of each subject's test file | even rows (5-shot from the subject's dev rows) |
| ``mlqa-<lang>`` | odd contexts of the dev split | even contexts (questions on one context stay together) |

One template everywhere: prompt ``"Question: {question}\\nAnswer:"`` followed by ``" {answer}"``. MLQA puts
``"Context: {context}\\n"`` in front; HumanEval uses the raw function prompt continued by the canonical solution.
Orders are deterministic (file order; MMLU round-robin over subjects) unless a ``seed`` asks for a shuffle.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
MLQA_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
MLQA_LANGUAGES = ("en", "de", "es", "ar", "zh", "vi", "hi")
MBPP_PROBE_IDS = (601, 974)
MBPP_EVAL_IDS = (11, 510)


@dataclass(frozen=True)
class EvalItem:
    """One example: a prompt and its reference answer, plus what the task-specific metrics need.

    Args:
        prompt: the text the model sees (ends with ``"Answer:"`` except for HumanEval).
        answer: the reference answer, without the separator.
        id: stable identifier (``"<skill>/<split>/<key>"``).
        answer_sep: text between prompt and answer (``" "``; ``""`` for HumanEval).
        choices / label / subject / shots: multiple choice (MMLU): the options, the index of the right one,
            the subject, and the few-shot dev examples of that subject.
        program_prefix / test_code: code execution (MBPP, HumanEval): the program run is
            ``program_prefix + completion + "\\n\\n" + test_code``.
    """

    prompt: str
    answer: str
    id: str = ""
    answer_sep: str = " "
    choices: tuple[str, ...] | None = None
    label: int | None = None
    subject: str | None = None
    shots: tuple[EvalItem, ...] = field(default=(), repr=False)
    program_prefix: str = field(default="", repr=False)
    test_code: str | None = field(default=None, repr=False)

    @property
    def completion(self) -> str:
        """The text appended to the prompt: ``answer_sep + answer``."""
        return self.answer_sep + self.answer

    @property
    def text(self) -> str:
        """Prompt and answer together, as used for teacher forcing and neuron statistics."""
        return self.prompt + self.completion


@dataclass(frozen=True)
class SkillSpec:
    """Static description of a skill.

    Args:
        name: skill name used by :func:`get_skill`.
        category: what it measures (``"math"``, ``"python"``, ``"knowledge"``, ``"language"``).
        hub_path / hub_config: the Hugging Face Hub data set used when no ``data_dir`` is given.
        folder: name of the skill's folder inside a local data root.
        description: one line for reports.
    """

    name: str
    category: str
    hub_path: str
    hub_config: str | None
    folder: str
    description: str = ""


_SPECS: dict[str, SkillSpec] = {
    "gsm8k": SkillSpec("gsm8k", "math", "openai/gsm8k", "main", "gsm8k", "grade-school math word problems"),
    "mbpp": SkillSpec(
        "mbpp", "python", "google-research-datasets/mbpp", "full", "mbpp", "basic Python tasks"
    ),
    "humaneval": SkillSpec(
        "humaneval", "python", "openai/openai_humaneval", None, "humaneval", "Python function completion"
    ),
    "mmlu": SkillSpec("mmlu", "knowledge", "cais/mmlu", "all", "mmlu", "57-subject multiple choice"),
    **{
        f"mlqa-{lang}": SkillSpec(
            f"mlqa-{lang}",
            "language",
            "facebook/mlqa",
            f"mlqa.{lang}.{lang}",
            "mlqa",
            f"MLQA reading ({lang})",
        )
        for lang in MLQA_LANGUAGES
    },
}


def available_skills() -> list[str]:
    """Names accepted by :func:`get_skill`."""
    return list(_SPECS)


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def get_skill(name: str, data_dir: str | Path | None = None, seed: int | None = None) -> Skill:
    """Return the skill called ``name``.

    Args:
        name: one of :func:`available_skills` (case-insensitive; ``mlqa_de`` is accepted for ``mlqa-de``).
        data_dir: local data: the folder holding all skills' folders or this skill's own folder. ``None``
            downloads from the Hugging Face Hub through ``datasets.load_dataset``.
        seed: shuffle probe and eval orders with this seed; ``None`` keeps the deterministic file order.

    Raises:
        ValueError: unknown skill name (the message lists the known ones).
        FileNotFoundError: ``data_dir`` does not exist.
    """
    key = _normalise_name(name)
    if key not in _SPECS:
        raise ValueError(f"Unknown skill {name!r}. Known skills: {', '.join(available_skills())}.")
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise FileNotFoundError(f"Skill data folder {str(data_dir)!r} does not exist or is not a folder.")
    return Skill(_SPECS[key], Path(data_dir).expanduser() if data_dir is not None else None, seed)


@dataclass
class Skill:
    """A skill's data: probe items (to fit an unlearning method) and disjoint evaluation items.

    Use :func:`get_skill` to build one. Items are loaded on first use and kept.

    Args:
        spec: the skill's static description.
        data_dir: local data folder, or ``None`` for the Hugging Face Hub.
        seed: optional shuffle seed for both splits.
    """

    spec: SkillSpec
    data_dir: Path | None = None
    seed: int | None = None
    _splits: dict[str, list[EvalItem]] = field(default_factory=dict, init=False, repr=False)
    _dev: dict[str, tuple[EvalItem, ...]] = field(default_factory=dict, init=False, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def category(self) -> str:
        return self.spec.category

    # public API -------------------------------------------------------------------------------------------
    def probe_items(self, n: int | None = None) -> list[EvalItem]:
        """The first ``n`` (default all) items of the probe split."""
        return _take(self._split("probe"), n, self.name, "probe")

    def eval_items(self, n: int | None = None) -> list[EvalItem]:
        """The first ``n`` (default all) items of the evaluation split, disjoint from the probe split."""
        return _take(self._split("eval"), n, self.name, "eval")

    def probe_texts(self, n: int | None = None) -> list[str]:
        """Prompt + answer texts of the probe split (for neuron statistics: Neuron Adjust, pruning)."""
        return [item.text for item in self.probe_items(n)]

    def probe_queries(self, n: int | None = None) -> list[str]:
        """Prompts only of the probe split (for Key Space Detection)."""
        return [item.prompt for item in self.probe_items(n)]

    def probe_pairs(self, n: int | None = None) -> list[dict[str, str]]:
        """``{"prompt", "completion", "text"}`` dicts of the probe split, for prompt/completion token modes."""
        return [
            {"prompt": it.prompt, "completion": it.completion, "text": it.text} for it in self.probe_items(n)
        ]

    def dev_shots(self, subject: str) -> tuple[EvalItem, ...]:
        """MMLU only: the dev examples (5) of ``subject``."""
        if self.spec.name != "mmlu":
            raise ValueError(f"dev_shots is only defined for 'mmlu', not {self.name!r}.")
        self._split("eval")
        if subject not in self._dev:
            raise ValueError(f"Unknown MMLU subject {subject!r}. Known: {', '.join(sorted(self._dev))}.")
        return self._dev[subject]

    # loading ----------------------------------------------------------------------------------------------
    def _split(self, which: str) -> list[EvalItem]:
        if which not in self._splits:
            loader = _LOADERS[self.spec.name.split("-")[0]]
            probe, evals = loader(self)
            for items, part in ((probe, "probe"), (evals, "eval")):
                if self.seed is not None:
                    random.Random(f"{self.seed}/{self.name}/{part}").shuffle(items)
            self._splits["probe"], self._splits["eval"] = probe, evals
            logger.debug("Loaded skill %s: %d probe / %d eval items", self.name, len(probe), len(evals))
        return self._splits[which]

    def _local_base(self, required: Sequence[str]) -> Path:
        """The folder under ``data_dir`` that contains all ``required`` relative paths."""
        assert self.data_dir is not None
        root = self.data_dir
        candidates = [root / self.spec.folder, root]
        if self.spec.folder == "mlqa":
            candidates = [root / "mlqa" / "dev", root / "dev", root]
        for base in candidates:
            if all((base / rel).exists() for rel in required):
                return base
        raise FileNotFoundError(
            f"Skill {self.name!r}: could not find {list(required)} in {[str(c) for c in candidates]}. Pass the "
            f"folder of all skills or the skill's own folder as data_dir, or data_dir=None to load "
            f"{self.spec.hub_path!r} from the Hugging Face Hub."
        )

    def _hub_rows(self, split: str, config: str | None = None) -> list[dict[str, Any]]:
        import datasets

        config = config if config is not None else self.spec.hub_config
        logger.info("Loading %s (%s, split %s) from the Hugging Face Hub", self.spec.hub_path, config, split)
        ds = datasets.load_dataset(self.spec.hub_path, config, split=split)
        return ds.to_list() if hasattr(ds, "to_list") else [dict(r) for r in ds]


# helpers ------------------------------------------------------------------------------------------------------
def _take(items: list[EvalItem], n: int | None, name: str, part: str) -> list[EvalItem]:
    if n is None:
        return list(items)
    if n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}.")
    if n > len(items):
        logger.warning("Skill %s: asked for %d %s items, only %d exist.", name, n, part, len(items))
    return list(items[:n])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _check_columns(rows: Iterable[Mapping[str, Any]], required: Sequence[str], source: str) -> None:
    for i, row in enumerate(rows):
        missing = [c for c in required if c not in row]
        if missing:
            raise KeyError(f"{source}: row {i} has no column(s) {missing}; available columns: {sorted(row)}.")


def _lf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _qa(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


# per-skill loaders: each returns (probe items, eval items) --------------------------------------------------
def _load_gsm8k(skill: Skill) -> tuple[list[EvalItem], list[EvalItem]]:
    out = []
    for split in ("train", "test"):
        if skill.data_dir is not None:
            path = skill._local_base([f"{split}.jsonl"]) / f"{split}.jsonl"
            rows, source = _read_jsonl(path), str(path)
        else:
            rows, source = skill._hub_rows(split), f"{skill.spec.hub_path}[{split}]"
        _check_columns(rows, ("question", "answer"), source)
        out.append(
            [EvalItem(_qa(r["question"]), r["answer"], f"gsm8k/{split}/{i}") for i, r in enumerate(rows)]
        )
    return out[0], out[1]


def _mbpp_item(row: Mapping[str, Any], split: str) -> EvalItem:
    tests = row["test_list"]
    tests = [tests] if isinstance(tests, str) else list(tests)
    setup = _lf(row.get("test_setup_code") or "")
    test_code = (setup + "\n" if setup.strip() else "") + "\n".join(_lf(t) for t in tests) + "\n"
    return EvalItem(_qa(row["text"]), _lf(row["code"]), f"mbpp/{split}/{row['task_id']}", test_code=test_code)


def _load_mbpp(skill: Skill) -> tuple[list[EvalItem], list[EvalItem]]:
    needed = ("task_id", "text", "code", "test_list")
    if skill.data_dir is not None:
        path = skill._local_base(["mbpp.jsonl"]) / "mbpp.jsonl"
        rows = _read_jsonl(path)
        _check_columns(rows, needed, str(path))
        by_split = {"train": rows, "test": rows}
    else:
        by_split = {s: skill._hub_rows(s) for s in ("train", "test")}
        for s, rows in by_split.items():
            _check_columns(rows, needed, f"{skill.spec.hub_path}[{s}]")
    out = []
    for split, (lo, hi) in (("train", MBPP_PROBE_IDS), ("test", MBPP_EVAL_IDS)):
        rows = sorted(
            (r for r in by_split[split] if lo <= int(r["task_id"]) <= hi), key=lambda r: int(r["task_id"])
        )
        out.append([_mbpp_item(r, split) for r in rows])
    return out[0], out[1]


def _load_humaneval(skill: Skill) -> tuple[list[EvalItem], list[EvalItem]]:
    if skill.data_dir is not None:
        path: Path | None = None
        for name in ("HumanEval.jsonl.gz", "HumanEval.jsonl"):
            try:
                path = skill._local_base([name]) / name
                break
            except FileNotFoundError:
                continue
        if path is None:
            skill._local_base(["HumanEval.jsonl.gz"])  # raises the standard message
            raise AssertionError
        rows, source = _read_jsonl(path), str(path)
    else:
        rows, source = skill._hub_rows("test"), f"{skill.spec.hub_path}[test]"
    _check_columns(rows, ("task_id", "prompt", "canonical_solution", "test", "entry_point"), source)
    items = [
        EvalItem(
            r["prompt"],
            r["canonical_solution"],
            f"humaneval/{r['task_id']}",
            answer_sep="",
            program_prefix=r["prompt"],
            test_code=f"{r['test']}\n\ncheck({r['entry_point']})\n",
        )
        for r in rows
    ]
    return items[1::2], items[0::2]


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


def _mmlu_rows(skill: Skill, split: str) -> dict[str, list[dict[str, Any]]]:
    """Rows of ``split`` grouped by subject, each with ``question``, ``choices`` (list), ``answer``."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    if skill.data_dir is not None:
        folder = skill._local_base([split]) / split
        files = sorted(folder.glob(f"*_{split}.csv"))
        if not files:
            raise FileNotFoundError(f"Skill 'mmlu': no *_{split}.csv files in {folder}.")
        for path in files:
            rows = _read_csv(path)
            _check_columns(
                rows, ("question", "choice0", "choice1", "choice2", "choice3", "answer"), str(path)
            )
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
        rows = skill._hub_rows(split)
        source = f"{skill.spec.hub_path}[{split}]"
        _check_columns(rows, ("question", "subject", "choices", "answer"), source)
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


def _load_mmlu(skill: Skill) -> tuple[list[EvalItem], list[EvalItem]]:
    def make(r: Mapping[str, Any], subject: str, key: str, shots: tuple[EvalItem, ...] = ()) -> EvalItem:
        choices = tuple(str(c) for c in r["choices"])
        return EvalItem(
            _qa(r["question"]),
            choices[r["answer"]],
            key,
            choices=choices,
            label=r["answer"],
            subject=subject,
            shots=shots,
        )

    dev = _mmlu_rows(skill, "dev")
    test = _mmlu_rows(skill, "test")
    skill._dev = {
        s: tuple(make(r, s, f"mmlu/dev/{s}/{i}") for i, r in enumerate(rows)) for s, rows in dev.items()
    }
    probe_by: dict[str, list[EvalItem]] = {}
    eval_by: dict[str, list[EvalItem]] = {}
    for subject, rows in test.items():
        shots = skill._dev.get(subject, ())
        if len(shots) < 5:
            logger.warning("MMLU subject %s has %d dev examples (5 expected).", subject, len(shots))
        items = [make(r, subject, f"mmlu/test/{subject}/{i}", shots) for i, r in enumerate(rows)]
        probe_by[subject], eval_by[subject] = items[1::2], items[0::2]
    return _round_robin(probe_by), _round_robin(eval_by)


def _round_robin(groups: Mapping[str, list[EvalItem]]) -> list[EvalItem]:
    """Interleave groups (one item of each in turn) so that any prefix covers every group."""
    out: list[EvalItem] = []
    longest = max((len(g) for g in groups.values()), default=0)
    for i in range(longest):
        out.extend(g[i] for g in groups.values() if i < len(g))
    return out


def _load_mlqa(skill: Skill) -> tuple[list[EvalItem], list[EvalItem]]:
    lang = skill.spec.name.split("-", 1)[1]
    rows: list[dict[str, Any]] = []
    if skill.data_dir is not None:
        name = f"dev-context-{lang}-question-{lang}.json"
        path = skill._local_base([name]) / name
        source = str(path)
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if "data" not in doc:
            raise KeyError(f"{source}: not SQuAD-format JSON (no 'data' key; keys: {sorted(doc)}).")
        for article in doc["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    rows.append(
                        {
                            "context": para["context"],
                            "question": qa["question"],
                            "answers": [a["text"] for a in qa["answers"]],
                            "id": qa["id"],
                        }
                    )
    else:
        source = f"{skill.spec.hub_path}[{skill.spec.hub_config}, validation]"
        for r in skill._hub_rows("validation"):
            answers = r.get("answers")
            rows.append(
                {**r, "answers": answers.get("text", []) if isinstance(answers, Mapping) else answers}
            )
    _check_columns(rows, ("context", "question", "answers", "id"), source)
    groups: dict[str, int] = {}
    probe: list[EvalItem] = []
    evals: list[EvalItem] = []
    for r in rows:
        if not r["answers"]:
            raise ValueError(f"{source}: question {r['id']} has no answer.")
        group = groups.setdefault(r["context"], len(groups))
        item = EvalItem(
            MLQA_TEMPLATE.format(context=r["context"], question=r["question"]),
            r["answers"][0],
            f"mlqa-{lang}/dev/{r['id']}",
        )
        (evals if group % 2 == 0 else probe).append(item)
    return probe, evals


_LOADERS: dict[str, Callable[[Skill], tuple[list[EvalItem], list[EvalItem]]]] = {
    "gsm8k": _load_gsm8k,
    "mbpp": _load_mbpp,
    "humaneval": _load_humaneval,
    "mmlu": _load_mmlu,
    "mlqa": _load_mlqa,
}
