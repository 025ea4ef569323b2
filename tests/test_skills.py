"""Skill definitions on the shared data copies, and the Hub path through a fake ``datasets.load_dataset``."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import datasets
import pytest

from unlearn_hf.evaluation.items import EvalItem
from unlearn_hf.evaluation.skill_specs import MLQA_LANGUAGES
from unlearn_hf.evaluation.skills import available_skills, get_skill


def shared_data_dir() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


DATA = shared_data_dir()

# (probe, eval) sizes on the shared copies
SIZES = {
    "gsm8k": (7473, 1319),
    "mbpp": (
        374,
        497,
    ),  # 500 test tasks, 3 of them train tasks (test_copies_of_probe_items_are_not_evaluated)
    "humaneval": (82, 82),
    "mmlu": (7010, 6981),  # 7032 even test rows, 51 of them repeat an odd row
    "mlqa-en": (582, 566),
    "mlqa-de": (255, 257),
    "mlqa-es": (254, 246),
    "mlqa-ar": (247, 270),
    "mlqa-zh": (252, 252),
    "mlqa-vi": (258, 253),
    "mlqa-hi": (248, 259),
}
MLQA_TOTALS = {"en": 1148, "de": 512, "es": 500, "ar": 517, "zh": 504, "vi": 511, "hi": 507}


def test_available_skills():
    assert available_skills() == ["gsm8k", "mbpp", "humaneval", "mmlu"] + [
        f"mlqa-{x}" for x in MLQA_LANGUAGES
    ]


@pytest.mark.parametrize("name", list(SIZES))
def test_counts_and_disjoint_splits(name):
    skill = get_skill(name, DATA)
    probe, evals = skill.probe_items(), skill.eval_items()
    assert (len(probe), len(evals)) == SIZES[name]
    assert all(isinstance(it, EvalItem) for it in probe + evals)
    assert not {it.id for it in probe} & {it.id for it in evals}
    assert len({it.id for it in probe + evals}) == len(probe) + len(evals)
    assert skill.probe_texts(5) == [it.prompt + it.completion for it in probe[:5]]
    assert skill.probe_queries(5) == [it.prompt for it in probe[:5]]
    assert skill.eval_items(3) == evals[:3]
    pairs = skill.probe_pairs(2)
    assert pairs[0]["text"] == pairs[0]["prompt"] + pairs[0]["completion"]
    if name.startswith("mlqa"):
        assert len(probe) + len(evals) == MLQA_TOTALS[name.split("-")[1]]
        contexts = lambda items: {it.prompt.split("\nQuestion: ")[0] for it in items}  # noqa: E731
        assert not contexts(probe) & contexts(evals)


def _normalised(*texts: str) -> tuple[str, ...]:
    return tuple(re.sub(r"\s+", " ", t).strip().lower() for t in texts)


def test_copies_of_probe_items_are_not_evaluated():
    """A data set's splits hold copies: three MBPP test tasks are train tasks, and MMLU's test files repeat
    questions within and across subjects (51 even rows repeat an odd row). The evaluation items were scored after a
    fit on the probe items they copy (a review); they are left out, counted here from the raw files."""
    raw = [json.loads(line) for line in open(DATA / "mbpp" / "mbpp.jsonl", encoding="utf-8")]
    train = {_normalised(r["text"]) for r in raw if 601 <= r["task_id"] <= 974}
    copies = sorted(
        r["task_id"] for r in raw if 11 <= r["task_id"] <= 510 and _normalised(r["text"]) in train
    )
    assert copies == [216, 217, 248]
    mbpp_ids = {int(it.id.rsplit("/", 1)[1]) for it in get_skill("mbpp", DATA).eval_items()}
    assert not mbpp_ids & set(copies) and len(mbpp_ids) == 500 - len(copies)
    odd, even = [], []
    for path in sorted((DATA / "mmlu" / "test").glob("*.csv")):
        with open(path, encoding="utf-8", newline="") as f:
            rows = [
                _normalised(r["question"], *(r[f"choice{j}"] for j in range(4))) for r in csv.DictReader(f)
            ]
        odd += rows[1::2]
        even += rows[0::2]
    repeated = [r for r in even if r in set(odd)]
    assert len(repeated) == 51 and len(even) == 7032
    mmlu = get_skill("mmlu", DATA)
    kept = {_normalised(it.question.split("\nA. ")[0], *it.choices) for it in mmlu.eval_items()}
    assert len(mmlu.eval_items()) == len(even) - len(repeated) and not kept & set(repeated)


def test_gsm8k_template():
    skill = get_skill("gsm8k", DATA)
    item = skill.eval_items(1)[0]
    assert item.prompt.startswith("Question: Janet’s ducks lay 16 eggs per day.")
    assert item.prompt.endswith("\nAnswer:") and item.answer.endswith("#### 18")
    assert item.text == item.prompt + " " + item.answer
    assert skill.probe_items(1)[0].id == "gsm8k/train/0" and item.id == "gsm8k/test/0"


def test_mbpp_splits_templates_and_crlf():
    raw = [json.loads(line) for line in open(DATA / "mbpp" / "mbpp.jsonl", encoding="utf-8")]
    assert any("\r\n" in r["code"] for r in raw)
    skill = get_skill("mbpp", DATA)
    probe_ids = [int(it.id.rsplit("/", 1)[1]) for it in skill.probe_items()]
    eval_ids = [int(it.id.rsplit("/", 1)[1]) for it in skill.eval_items()]
    assert probe_ids == list(range(601, 975))
    assert eval_ids == [i for i in range(11, 511) if i not in (216, 217, 248)]  # train tasks 872, 602, 704
    by_id = {r["task_id"]: r for r in raw}
    item = skill.eval_items(1)[0]
    assert item.prompt == f"Question: {by_id[11]['text']}\nAnswer:"
    assert item.answer == by_id[11]["code"].replace("\r\n", "\n")
    assert all("\r" not in it.answer and "\r" not in (it.test_code or "") for it in skill.eval_items())
    assert item.test_code.strip().splitlines() == [t for t in by_id[11]["test_list"]]


def test_humaneval_template():
    skill = get_skill("humaneval", DATA)
    item = skill.eval_items(1)[0]
    assert item.id == "humaneval/HumanEval/0" and skill.probe_items(1)[0].id == "humaneval/HumanEval/1"
    assert item.prompt.startswith("from typing import List") and item.answer_sep == ""
    assert item.text == item.prompt + item.answer and item.program_prefix == item.prompt
    assert item.test_code.rstrip().endswith("check(has_close_elements)")


def test_mmlu_items_and_shots():
    skill = get_skill("mmlu", DATA)
    evals = skill.eval_items(57)
    assert len({it.subject for it in evals}) == 57  # round-robin: any prefix covers the subjects
    item = evals[0]
    assert item.subject == "abstract_algebra" and item.id == "mmlu/test/abstract_algebra/0"
    assert item.prompt.startswith("Question: Find the degree") and item.prompt.endswith("\nAnswer:")
    assert len(item.choices) == 4 and item.answer == item.choices[item.label]
    assert len(item.shots) == 5 and item.shots == skill.dev_shots("abstract_algebra")
    assert all(s.label is not None for s in item.shots)
    with pytest.raises(ValueError, match="Unknown MMLU subject"):
        skill.dev_shots("astrology")
    with pytest.raises(ValueError, match="only defined for 'mmlu'"):
        get_skill("gsm8k", DATA).dev_shots("x")


def test_mlqa_template():
    skill = get_skill("mlqa-en", DATA)
    item = skill.eval_items(1)[0]
    assert item.prompt.startswith("Context: ") and "\nQuestion: " in item.prompt
    assert item.prompt.endswith("\nAnswer:")
    assert item.answer == "remains infected for its lifetime"


def test_data_dir_may_be_the_skill_folder():
    assert get_skill("gsm8k", DATA / "gsm8k").eval_items(2) == get_skill("gsm8k", DATA).eval_items(2)
    assert get_skill("mlqa-de", DATA / "mlqa").eval_items(2) == get_skill("mlqa-de", DATA).eval_items(2)
    assert get_skill("mlqa-de", DATA / "mlqa" / "dev").eval_items(2) == get_skill("mlqa-de", DATA).eval_items(
        2
    )
    assert len(get_skill("humaneval", str(DATA / "humaneval")).eval_items()) == 82


def test_seed_shuffles_deterministically():
    a = get_skill("humaneval", DATA, seed=1).eval_items()
    b = get_skill("humaneval", DATA, seed=1).eval_items()
    c = get_skill("humaneval", DATA).eval_items()
    assert a == b and a != c and sorted(x.id for x in a) == sorted(x.id for x in c)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown skill 'gsm9k'.*gsm8k.*mlqa-hi"):
        get_skill("gsm9k", DATA)
    assert get_skill("MLQA_DE", DATA).name == "mlqa-de"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_skill("gsm8k", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl.*openai/gsm8k"):
        get_skill("gsm8k", tmp_path).eval_items()
    (tmp_path / "gsm8k").mkdir()
    for split in ("train", "test"):
        (tmp_path / "gsm8k" / f"{split}.jsonl").write_text(
            json.dumps({"question": "q", "solution": "a"}) + "\n"
        )
    with pytest.raises(KeyError, match=r"'answer'.*available columns: \['question', 'solution'\]"):
        get_skill("gsm8k", tmp_path).probe_items()
    with pytest.raises(ValueError, match="n must be"):
        get_skill("humaneval", DATA).eval_items(-1)


class FakeHub:
    """Stands in for ``datasets.load_dataset``: tiny in-memory splits, and a record of the calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, path, name=None, split=None, **kwargs):
        self.calls.append((path, name, split))
        rows = self.rows(path, name, split)
        return datasets.Dataset.from_list(rows) if path != "openai/openai_humaneval" else rows

    @staticmethod
    def rows(path, name, split):
        if path == "openai/gsm8k":
            return [{"question": f"{split} q{i}", "answer": f"work #### {i}"} for i in range(3)]
        if path == "google-research-datasets/mbpp":
            ids = {"train": [601, 602], "test": [11, 12, 13]}[split]
            return [
                {"task_id": t, "text": f"task {t}", "code": "def f():\r\n    return 1", "test_list": ["assert f() == 1"],
                 "test_setup_code": "", "challenge_test_list": []}
                for t in ids
            ]  # fmt: skip
        if path == "openai/openai_humaneval":
            return [
                {"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "canonical_solution": "    return 1\n",
                 "test": "def check(c):\n    assert c() == 1\n", "entry_point": f"f{i}"}
                for i in range(4)
            ]  # fmt: skip
        if path == "cais/mmlu":
            n = 5 if split == "dev" else 4
            return [
                {
                    "question": f"{s} {split} {i}?",
                    "subject": s,
                    "choices": ["a", "b", "c", "d"],
                    "answer": i % 4,
                }
                for s in ("astronomy", "anatomy")
                for i in range(n)
            ]
        if path == "facebook/mlqa":
            return [
                {"context": f"ctx {i // 2}", "question": f"q{i}", "id": f"id{i}",
                 "answers": {"answer_start": [0], "text": [f"ans{i}"]}}
                for i in range(6)
            ]  # fmt: skip
        raise AssertionError(f"unexpected data set {path}")


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", hub)
    return hub


def test_hub_gsm8k(fake_hub):
    skill = get_skill("gsm8k")
    assert skill.probe_queries() == [f"Question: train q{i}\nAnswer:" for i in range(3)]
    assert [it.answer for it in skill.eval_items()] == [f"work #### {i}" for i in range(3)]
    assert fake_hub.calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]


def test_hub_mbpp_humaneval_mmlu_mlqa(fake_hub):
    mbpp = get_skill("mbpp")
    assert [it.id for it in mbpp.probe_items()] == ["mbpp/train/601", "mbpp/train/602"]
    assert [it.answer for it in mbpp.eval_items()] == ["def f():\n    return 1"] * 3
    assert ("google-research-datasets/mbpp", "full", "test") in fake_hub.calls

    human = get_skill("humaneval")
    assert [it.id for it in human.eval_items()] == ["humaneval/HumanEval/0", "humaneval/HumanEval/2"]
    assert fake_hub.calls[-1] == ("openai/openai_humaneval", None, "test")

    mmlu = get_skill("mmlu")
    evals = mmlu.eval_items()
    assert [it.subject for it in evals] == ["anatomy", "astronomy"] * 2
    assert len(evals[0].shots) == 5 and evals[0].label == 0 and evals[0].answer == "a"
    assert {c[2] for c in fake_hub.calls if c[0] == "cais/mmlu"} == {"dev", "test"}

    mlqa = get_skill("mlqa-vi")
    assert [it.answer for it in mlqa.eval_items()] == ["ans0", "ans1", "ans4", "ans5"]
    assert [it.answer for it in mlqa.probe_items()] == ["ans2", "ans3"]
    assert fake_hub.calls[-1] == ("facebook/mlqa", "mlqa.vi.vi", "validation")


def test_hub_missing_column(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"question": "q"}])
    with pytest.raises(KeyError, match=r"openai/gsm8k\[train\].*'answer'.*available columns: \['question'\]"):
        get_skill("gsm8k").probe_items()


# found by a review of the data paths
def test_jsonl_records_may_hold_unicode_line_separators_and_files_a_byte_order_mark(tmp_path):
    """A JSONL file written with ensure_ascii=False may hold U+2028 / U+2029 / U+0085 inside strings (only "\\n"
    ends a record), and a file saved as "UTF-8 with BOM" starts with U+FEFF: both are valid data."""
    from unlearn_hf.evaluation.data_files import read_csv, read_jsonl

    rows = [{"question": f"q{i} a\u2028b\u2029c\u0085d", "answer": f"w #### {i}"} for i in range(3)]
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())
    assert read_jsonl(path) == rows
    path.write_text("\r".join(json.dumps(r) for r in rows))  # classic Mac line ends
    assert read_jsonl(path) == rows
    csv_path = tmp_path / "a.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfquestion,A\r\nwhat?,x\r\n")
    assert read_csv(csv_path) == [{"question": "what?", "A": "x"}]


def test_an_mlqa_answer_that_is_not_text_is_named(tmp_path):
    doc = {
        "data": [
            {
                "paragraphs": [
                    {"context": "c", "qas": [{"id": "q-7", "question": "who?", "answers": [{"text": None}]}]}
                ]
            }
        ]
    }
    (tmp_path / "mlqa" / "dev").mkdir(parents=True)
    (tmp_path / "mlqa" / "dev" / "dev-context-en-question-en.json").write_text(json.dumps(doc))
    with pytest.raises(
        ValueError, match=r"question q-7 has an answer that is not text or is empty: \[None\]"
    ):
        get_skill("mlqa-en", tmp_path).eval_items()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("skill", ["gsm8k", "mbpp", "mlqa-en"])
def test_an_empty_answer_is_named_not_scored(tmp_path, skill):
    """An item whose answer is empty was scored on nothing (the separator token alone: GSM8K printed 0.000 with no
    word; a review); now the loader names the file, the row and the column."""
    from unlearn_hf.evaluation.data_files import DataFileError

    if skill == "gsm8k":
        rows = [
            {"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"},
            {"question": "q", "answer": " "},
        ]
        write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows[:1])
        write_jsonl(tmp_path / "gsm8k" / "test.jsonl", rows)
        error, message = DataFileError, r"test.jsonl: row 1, column 'answer' is empty"
    elif skill == "mbpp":
        write_jsonl(tmp_path / "mbpp" / "mbpp.jsonl", [MBPP_ROW, {**MBPP_ROW, "task_id": 602, "code": ""}])
        error, message = DataFileError, r"mbpp.jsonl: row 1, column 'code' is empty"
    else:
        doc = {
            "data": [
                {
                    "paragraphs": [
                        {"context": "c", "qas": [QA, {**QA, "id": "q-2", "answers": [{"text": ""}]}]}
                    ]
                }
            ]
        }
        path = tmp_path / "mlqa" / "dev" / "dev-context-en-question-en.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(doc))
        error, message = ValueError, r"question q-2 has an answer that is not text or is empty: \[''\]"
    with pytest.raises(error, match=message):
        get_skill(skill, tmp_path).eval_items()


MBPP_ROW = {"task_id": 601, "text": "t", "code": "c", "test_list": ["assert True"]}
QA = {"id": "q-1", "question": "who?", "answers": [{"text": "me"}]}


@pytest.mark.parametrize(
    "skill, record, message",
    [
        ("mbpp", {**MBPP_ROW, "task_id": "abc"}, "row 0, task_id 'abc' is not an integer"),
        ("mbpp", {**MBPP_ROW, "task_id": True}, "row 0, task_id True is not an integer"),
        (
            "mbpp",
            {**MBPP_ROW, "test_list": None},
            r"row 0 \(task 601\), test_list must be a list of text, got None",
        ),
        ("mbpp", {**MBPP_ROW, "test_list": ["a", 3]}, r"test_list must be a list of text, got \['a', 3\]"),
        ("mbpp", {**MBPP_ROW, "test_setup_code": 7}, "test_setup_code must be text, got int"),
        ("mlqa-en", {"data": [{"title": "t"}]}, r"data\[0\] has no 'paragraphs' \(not SQuAD-format JSON\)"),
        ("mlqa-en", {"data": {"a": 1}}, ": data must be a list, got dict"),
        (
            "mlqa-en",
            {"data": [{"paragraphs": [{"context": "c", "qas": "x"}]}]},
            r"data\[0\].paragraphs\[0\].qas must be a list, got str",
        ),
        (
            "mlqa-en",
            {"data": [{"paragraphs": [{"qas": [QA]}]}]},
            r"data\[0\].paragraphs\[0\] has no 'context'",
        ),
        (
            "mlqa-en",
            {"data": [{"paragraphs": [{"context": "c", "qas": [{**QA, "answers": [{"answer": "me"}]}]}]}]},
            r"data\[0\].paragraphs\[0\].qas\[0\].answers\[0\] has no 'text'",
        ),
        (
            "mlqa-en",
            {"data": [{"paragraphs": [{"context": "c", "qas": [{**QA, "question": None}]}]}]},
            r"qas\[0\].question must be a str, got NoneType",
        ),
    ],
)
def test_a_malformed_mbpp_or_mlqa_record_is_named_with_its_file_and_place(tmp_path, skill, record, message):
    """A task_id "abc", a null test_list, a SQuAD document without its paragraphs gave raw Python errors that named
    no file (ValueError: invalid literal for int(), TypeError: 'NoneType' object is not iterable, KeyError:
    'paragraphs'); now a DataFileError names the file, the row or the place in the document, and the field
    (a review of the data paths)."""
    from unlearn_hf.evaluation.data_files import DataFileError

    if skill == "mbpp":
        path = tmp_path / "mbpp" / "mbpp.jsonl"
        text = json.dumps(record) + "\n"
    else:
        path = tmp_path / "mlqa" / "dev" / "dev-context-en-question-en.json"
        text = json.dumps(record)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(DataFileError, match=message) as err:
        get_skill(skill, tmp_path).eval_items()
    assert str(path) in str(err.value)


def test_mbpp_task_ids_written_as_digit_strings_or_whole_floats_are_read():
    """A task_id saved as "601" (a CSV export), 601.0 or a numpy integer is still the integer id 601."""
    import numpy as np

    from unlearn_hf.evaluation.skill_loaders import _check_mbpp_rows, _mbpp_item

    rows = [{**MBPP_ROW, "task_id": t} for t in ("601", " 601 ", 601.0, np.int64(601))]
    _check_mbpp_rows([*rows, {**MBPP_ROW, "test_list": ("assert 1",)}], "x.jsonl")
    assert {_mbpp_item(r, "train").id for r in rows} == {"mbpp/train/601"}


@pytest.mark.parametrize("row, fields", [("What?,a,b,c\n", 4), ("What?,a,b,c,d,A,extra\n", 7)])
def test_a_csv_row_with_the_wrong_number_of_fields_is_named(tmp_path, row, fields):
    """A cut MMLU row gave "answer None is neither 0-3 nor A-D" without a line; a row with an extra field was read,
    the extra value dropped (a review)."""
    from unlearn_hf.evaluation.data_files import DataFileError

    for split in ("dev", "test"):
        folder = tmp_path / "mmlu" / split
        folder.mkdir(parents=True)
        text = "question,choice0,choice1,choice2,choice3,answer\nWho?,a,b,c,d,B\n" + row
        (folder / f"anatomy_{split}.csv").write_text(text)
    with pytest.raises(
        DataFileError, match=rf"anatomy_dev.csv: line 3 has {fields} fields, the header names 6"
    ):
        get_skill("mmlu", tmp_path).eval_items()
