"""Metrics against independent hand computations on a tiny trained llama, code execution and reports."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from unlearn_hf.evaluation.abstention import abstention_rate, detect_abstention
from unlearn_hf.evaluation.exact_match import extract_gsm8k_reference, extract_last_number, gsm8k_exact_match
from unlearn_hf.evaluation.execution import build_program, pass_at_1, run_program
from unlearn_hf.evaluation.generation import generate_completions
from unlearn_hf.evaluation.items import EvalItem
from unlearn_hf.evaluation.multiple_choice import mmlu_accuracy, mmlu_prompt
from unlearn_hf.evaluation.report import build_report, load_json, markdown_table, save_report
from unlearn_hf.evaluation.results import MetricResult, relative_drop
from unlearn_hf.evaluation.skills import get_skill
from unlearn_hf.evaluation.token_accuracy import answer_token_accuracy


def shared_data_dir() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


ITEMS = [
    EvalItem("Question: What is 2 + 3?\nAnswer:", "2 + 3 = 5. #### 5"),
    EvalItem(
        "Question: Tom has 4 apples and eats one. How many are left?\nAnswer:", "4 - 1 = 3 apples. #### 3"
    ),
    EvalItem(
        "Question: Write a function that adds two numbers.\nAnswer:", "def add(a, b):\n    return a + b"
    ),
    EvalItem("Question: What is the capital of France?\nAnswer:", "Paris"),
    EvalItem("Question: Double 21.\nAnswer:", "21 * 2 = 42 #### 42"),
    EvalItem("Question: Name a colour.\nAnswer:", "blue, like the sky"),
    EvalItem("Question: What is 10 / 2?\nAnswer:", "10 / 2 = 5 #### 5"),
    EvalItem("Question: Say hello.\nAnswer:", "hello hello hello world"),
    EvalItem("Question: Count to three.\nAnswer:", "one two three"),
]
# Never trained on: the model mispredicts most of their answer tokens while it has memorised most of ITEMS,
# so the accuracy on ITEMS + HELD_OUT lies far from 0 and from 1 whatever the (thread-count dependent)
# training run.
HELD_OUT = [
    EvalItem("Question: What is 7 + 6?\nAnswer:", "7 + 6 = 13. #### 13"),
    EvalItem("Question: Name a planet.\nAnswer:", "Mars, the red planet"),
    EvalItem(
        "Question: Write a function that multiplies two numbers.\nAnswer:", "def mul(x, y):\n    return x * y"
    ),
    EvalItem("Question: What is the capital of Italy?\nAnswer:", "Rome"),
    EvalItem("Question: Say goodbye.\nAnswer:", "goodbye cruel world"),
    EvalItem("Question: Count to five backwards.\nAnswer:", "five four three two one"),
]
EVAL_ITEMS = ITEMS + HELD_OUT

# Logit (or log-probability) gap below which a top-1 decision is a tie that a padded batch may resolve either
# way. The metric's logits (padded batches of 1-15 rows, either side) differed from the unpadded reference
# forward by at most 7.6e-6 over 16 training runs with 1, 4 and 16 threads, so a gap between two logits by at
# most 1.5e-5: TIE is ~65 times that. (No answer token of those runs had a margin under TIE.)
TIE = 1e-3
MC = [
    EvalItem(
        "Question: Which is a fruit?\nAnswer:",
        "apple",
        "mc/0",
        choices=("stone", "apple", "car", "sky"),
        label=1,
        subject="food",
        shots=(
            EvalItem(
                "Question: Which is red?\nAnswer:",
                "a cherry",
                choices=("a cherry", "grass", "sea", "sky"),
                label=0,
            ),
        ),
    ),  # fmt: skip
    EvalItem(
        "Question: Which is blue?\nAnswer:",
        "sky",
        "mc/1",
        choices=("sun", "grass", "coal", "sky"),
        label=3,
        subject="colours",
    ),  # fmt: skip
    EvalItem(
        "Question: 2 + 2?\nAnswer:", "4", "mc/2", choices=("3", "5", "4", "22"), label=2, subject="maths"
    ),
]


@pytest.fixture(scope="module")
def tokenizer():
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [it.text for it in ITEMS] + [mmlu_prompt(it, 1) + " A B C D" for it in MC]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny llama, trained for a few steps on ITEMS (not HELD_OUT): its accuracy is neither 0 nor 1."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=0,
    )
    lm = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    for _ in range(25):
        for it in ITEMS:
            ids = torch.tensor([tokenizer(it.text)["input_ids"]])
            loss = lm(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    return lm.eval()


@dataclass
class Reference:
    """Per item: ``lo`` answer tokens that are the top-1 prediction by more than TIE, ``hi`` those plus the
    ties (within TIE of the best other token), ``total`` answer tokens. Without ties ``lo == hi``."""

    lo: list[int]
    hi: list[int]
    total: list[int]


def reference_accuracy(model, tokenizer, items) -> Reference:
    """Answer-token hits counted from one unpadded forward per item, margins in float64 numpy."""
    lo, hi, total = [], [], []
    for it in items:
        ids = tokenizer(it.text)["input_ids"]
        n_prompt = len(tokenizer(it.prompt)["input_ids"])
        assert ids[:n_prompt] == tokenizer(it.prompt)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()[n_prompt - 1 : -1]
        target = np.array(ids[n_prompt:])
        rows = np.arange(len(target))
        others = logits.copy()
        others[rows, target] = -np.inf
        margin = logits[rows, target] - others.max(-1)  # > 0: the answer token is the top-1 prediction
        lo.append(int((margin > TIE).sum()))
        hi.append(int((margin >= -TIE).sum()))
        total.append(len(target))
    return Reference(lo, hi, total)


def assert_matches_reference(result: MetricResult, ref: Reference, abstained=None) -> None:
    """Each item's hit count lies in ``[lo, hi]`` of the reference (exactly ``lo`` without ties), abstained
    items count 0, and score, per-item accuracies and token counts are consistent with those counts."""
    abstained = abstained or [False] * len(ref.total)
    counts = [round(p * t) for p, t in zip(result.per_item, ref.total)]
    assert result.per_item == [c / t for c, t in zip(counts, ref.total)]
    assert all(c == 0 if a else lo <= c <= hi for c, lo, hi, a in zip(counts, ref.lo, ref.hi, abstained))
    assert result.details["n_tokens"] == sum(ref.total) and result.details["n_correct"] == sum(counts)
    assert result.score == sum(counts) / sum(ref.total)


@pytest.fixture(scope="module")
def reference(model, tokenizer) -> Reference:
    return reference_accuracy(model, tokenizer, EVAL_ITEMS)


def test_answer_token_accuracy_matches_reference(model, tokenizer, reference):
    # The check is meaningful: at least 10% of the answer tokens right and 10% wrong (measured over 16
    # training runs with 1, 4 and 16 threads: 63-87 of 154 right, 67-91 wrong, so >= 4x the 15.4 needed),
    # and ties rare (measured: none).
    n = sum(reference.total)
    assert sum(reference.lo) >= 0.1 * n and n - sum(reference.hi) >= 0.1 * n
    assert sum(reference.hi) - sum(reference.lo) <= n // 20
    result = answer_token_accuracy(model, tokenizer, EVAL_ITEMS, batch_size=4)
    assert isinstance(result, MetricResult)
    assert_matches_reference(result, reference)
    assert result.abstention_rate == 0.0 and result.abstained == [False] * len(EVAL_ITEMS)


@pytest.mark.parametrize("batch_size", [1, 3, 7])
@pytest.mark.parametrize("side", ["left", "right"])
def test_answer_token_accuracy_batch_and_padding_invariant(model, tokenizer, reference, batch_size, side):
    base = answer_token_accuracy(model, tokenizer, EVAL_ITEMS, batch_size=1, padding_side="right")
    other = answer_token_accuracy(model, tokenizer, EVAL_ITEMS, batch_size=batch_size, padding_side=side)
    assert_matches_reference(base, reference)
    assert_matches_reference(other, reference)
    untied = [i for i, (lo, hi) in enumerate(zip(reference.lo, reference.hi)) if lo == hi]
    assert [other.per_item[i] for i in untied] == [base.per_item[i] for i in untied]


def test_answer_token_accuracy_tuples_and_truncation(model, tokenizer):
    pairs = [(it.prompt, it.completion) for it in ITEMS[:3]]
    assert (
        answer_token_accuracy(model, tokenizer, pairs).score
        == answer_token_accuracy(model, tokenizer, ITEMS[:3]).score
    )
    short = answer_token_accuracy(model, tokenizer, ITEMS[:3], max_length=8)
    assert short.details["n_tokens"] <= 3 * 7
    assert 0.0 <= short.score <= 1.0
    assert math.isnan(answer_token_accuracy(model, tokenizer, []).score)


def test_a_model_with_learned_positions_is_scored_within_its_table_and_cut_items_are_counted(
    tokenizer, caplog
):
    """A GPT-2-like model with fewer positions than ``max_length`` crashed with ``IndexError`` in the middle of an
    evaluation (the fit clamps, the metrics did not), and prompts cut on the left were not reported (a review).
    Now every metric runs within the position table (the same scores as asking for that window), and the items
    that lost their start are counted and logged."""
    n_positions = 24
    config = AutoConfig.for_model(
        "gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=n_positions, vocab_size=len(tokenizer)
    )
    torch.manual_seed(0)
    gpt = AutoModelForCausalLM.from_config(config).eval()
    lengths = [len(tokenizer(it.text)["input_ids"]) for it in EVAL_ITEMS]
    longer = sum(n > n_positions for n in lengths)
    assert 0 < longer < len(EVAL_ITEMS)  # the premise: some items are cut, some are not
    with caplog.at_level("WARNING", logger="unlearn_hf.evaluation.token_accuracy"):
        result = answer_token_accuracy(gpt, tokenizer, EVAL_ITEMS, max_length=512, batch_size=3)
    assert result.details["n_truncated_items"] == longer
    assert f"{longer} of {len(EVAL_ITEMS)} items are longer than max_length={n_positions}" in caplog.text
    window = answer_token_accuracy(gpt, tokenizer, EVAL_ITEMS, max_length=n_positions, batch_size=3)
    assert result.per_item == window.per_item and result.score == window.score
    mc = mmlu_accuracy(gpt, tokenizer, MC, shots=1, max_length=2048)
    assert mc.per_item == mmlu_accuracy(gpt, tokenizer, MC, shots=1, max_length=n_positions).per_item
    letters = max(len(tokenizer(" " + x, add_special_tokens=False)["input_ids"]) for x in "ABCD")
    zero_shot = [len(tokenizer(mmlu_prompt(it, 0))["input_ids"]) for it in MC]
    assert mc.details["n_truncated_items"] == sum(n > n_positions - letters for n in zero_shot) > 0
    texts = generate_completions(gpt, tokenizer, EVAL_ITEMS[:4], max_new_tokens=6, max_length=512)
    assert texts == generate_completions(gpt, tokenizer, EVAL_ITEMS[:4], max_new_tokens=6, max_length=18)


def test_mmlu_drops_shots_by_the_rule_that_cuts_with_multi_token_letters():
    """With answer letters of two tokens (a character-level tokenizer) an item kept a shot that did not fit, then
    lost its start, while its zero-shot prompt would have fit (a review): shots are now dropped by the room the
    context has before the longest letter, the rule that cuts."""
    from tiny_models import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    item = MC[0]
    one, zero = (len(tok(mmlu_prompt(item, k))["input_ids"]) for k in (1, 0))
    assert len(tok(" A", add_special_tokens=False)["input_ids"]) == 2 and zero + 2 < one
    result = mmlu_accuracy(tiny_llama(vocab_size=128), tok, [item], shots=1, max_length=one + 1)
    assert result.details["mean_shots"] == 0 and result.details["n_truncated_items"] == 0


class FakeAbstainingModel(torch.nn.Module):
    """Wraps a model; abstains on prompts containing ``marker``; scoring must run with abstention disabled."""

    has_abstention = True

    def __init__(self, inner, marker_ids):
        super().__init__()
        self.inner = inner
        self.marker_ids = set(marker_ids)
        self.enabled = True
        self.detect_calls = []

    @property
    def device(self):
        return self.inner.device

    def detect(self, input_ids, attention_mask):
        self.detect_calls.append(attention_mask.sum(1).tolist())
        return torch.tensor(
            [bool(self.marker_ids & set(row[m.bool()].tolist())) for row, m in zip(input_ids, attention_mask)]
        )

    @contextlib.contextmanager
    def disable_abstention(self):
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = True

    def forward(self, **kwargs):
        assert not self.enabled, "scoring forward ran with abstention enabled"
        return self.inner(**kwargs)


def test_abstention_items_score_zero(model, tokenizer):
    marker = tokenizer(" apples", add_special_tokens=False)["input_ids"][-1:]
    fake = FakeAbstainingModel(model, marker)
    flags = [bool(set(marker) & set(tokenizer(it.prompt)["input_ids"])) for it in ITEMS]
    assert sum(flags) == 1
    result = answer_token_accuracy(fake, tokenizer, ITEMS, batch_size=4, padding_side="left")
    assert result.abstained == flags
    assert result.abstention_rate == pytest.approx(sum(flags) / len(ITEMS))
    assert_matches_reference(result, reference_accuracy(model, tokenizer, ITEMS), abstained=flags)
    assert all(result.per_item[i] == 0.0 for i, f in enumerate(flags) if f)
    # detect saw the prompts only (their real lengths), not prompt + answer
    prompt_lengths = sorted(len(tokenizer(it.prompt)["input_ids"]) for it in ITEMS)
    assert sorted(n for call in fake.detect_calls for n in call) == prompt_lengths
    assert detect_abstention(fake, tokenizer, ITEMS) == flags
    assert abstention_rate(fake, tokenizer, [it.prompt for it in ITEMS], batch_size=2) == pytest.approx(1 / 9)
    assert abstention_rate(model, tokenizer, ITEMS) == 0.0
    assert fake.enabled


def best_choices(scores) -> set[int]:
    """The choices within TIE of the best score: the one argmax, or the tied ones a padded batch may pick."""
    best = max(scores)
    return {k for k, v in enumerate(scores) if v >= best - TIE}


def test_mmlu_accuracy_matches_reference(model, tokenizer):
    prompt = mmlu_prompt(MC[0], shots=5)
    assert prompt == (
        "The following are multiple choice questions (with answers) about food.\n\n"
        "Question: Which is red?\nA. a cherry\nB. grass\nC. sea\nD. sky\nAnswer: A\n\n"
        "Question: Which is a fruit?\nA. stone\nB. apple\nC. car\nD. sky\nAnswer:"
    )
    letters = [tokenizer(" " + x, add_special_tokens=False)["input_ids"] for x in "ABCD"]
    assert all(len(t) == 1 for t in letters)
    allowed = []
    for it in MC:
        ids = tokenizer(mmlu_prompt(it, 5))["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1).numpy()
        allowed.append(best_choices([logp[t[0]] for t in letters]))
    for bs, side in [(1, "right"), (2, "left"), (3, "right")]:
        result = mmlu_accuracy(model, tokenizer, MC, batch_size=bs, padding_side=side)
        predictions = result.details["predictions"]
        assert all(p in a for p, a in zip(predictions, allowed))
        assert result.per_item == [float(p == it.label) for p, it in zip(predictions, MC)]
        assert result.score == pytest.approx(sum(result.per_item) / len(MC))

    fake = FakeAbstainingModel(model, tokenizer(" fruit", add_special_tokens=False)["input_ids"][-1:])
    abst = mmlu_accuracy(fake, tokenizer, MC)
    assert abst.abstained == [True, False, False]
    assert abst.per_item[0] == 0.0 and abst.details["predictions"][0] == -1
    assert all(p in a for p, a in zip(abst.details["predictions"][1:], allowed[1:]))
    assert abst.per_item[1:] == [
        float(p == it.label) for p, it in zip(abst.details["predictions"][1:], MC[1:])
    ]


def test_mmlu_accuracy_multi_token_letters(model, tokenizer, monkeypatch):
    """When the answer letters are not single tokens, full continuations are scored."""
    import unlearn_hf.evaluation.multiple_choice as multiple_choice

    monkeypatch.setattr(multiple_choice, "MMLU_LETTERS", ("Aq", "Bq", "Cq", "Dq"))
    conts = [tokenizer(" " + x, add_special_tokens=False)["input_ids"] for x in multiple_choice.MMLU_LETTERS]
    assert any(len(c) > 1 for c in conts)
    allowed = []
    for it in MC:
        ctx = tokenizer(multiple_choice.mmlu_prompt(it, 5))["input_ids"]
        scores = []
        for c in conts:
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + c])).logits[0].double(), -1)
            scores.append(sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(c)))
        allowed.append(best_choices(scores))
    predictions = multiple_choice.mmlu_accuracy(model, tokenizer, MC, batch_size=3).details["predictions"]
    assert all(p in a for p, a in zip(predictions, allowed))


def test_mmlu_on_real_items_builds_prompts():
    items = get_skill("mmlu", shared_data_dir()).eval_items(3)
    prompt = mmlu_prompt(items[0])
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith("\nD. " + items[0].choices[3] + "\nAnswer:")


def test_generate_completions_cuts_at_stop(model, tokenizer):
    out = generate_completions(model, tokenizer, ITEMS[:3], max_new_tokens=6, batch_size=2)
    assert len(out) == 3 and all(isinstance(o, str) and "\nQuestion:" not in o for o in out)


class _Scripted:
    """A stand-in model whose ``generate`` appends the same continuation to every row."""

    def __init__(self, tokenizer, continuation: str):
        self.ids = torch.tensor(tokenizer(continuation)["input_ids"])
        self.device = torch.device("cpu")

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        return torch.cat([input_ids, self.ids.expand(input_ids.shape[0], -1)], 1)


def test_generate_completions_cuts_each_item_at_its_own_stop(tokenizer):
    # A HumanEval completion ends where the function body does (the Codex evaluation's stop lines); a greedy model
    # that goes on with a test driver would fail its tests on that code, not on the function
    body = "    return a + b\n\n"
    tail = "if __name__ == '__main__':\n    print(add(1, 2))\nQuestion: x"
    human = get_skill("humaneval", shared_data_dir()).eval_items(2)
    plain = [it for it in ITEMS[:2]]
    model = _Scripted(tokenizer, body + tail)
    out = generate_completions(model, tokenizer, [*human, *plain, "Question: q\nAnswer:"], batch_size=2)
    assert out[:2] == [body.rstrip("\n") + "\n"] * 2
    assert out[2:] == [body + tail[: tail.index("\nQuestion:")]] * 3
    # every top-level line that leaves the body cuts; an indented one does not
    for line in ("def helper():", "class A:", "# test", "if True:", "print(1)"):
        model = _Scripted(tokenizer, body + line + "\n")
        assert generate_completions(model, tokenizer, human[:1]) == [body.rstrip("\n") + "\n"]
    nested = "    def inner():\n        return 1\n    if a:\n        print(a)\n    return inner()\n"
    assert generate_completions(_Scripted(tokenizer, nested), tokenizer, human[:1]) == [nested]
    # stop= given: it ends every completion, whatever the item
    assert generate_completions(model, tokenizer, human[:1] + plain[:1], stop=["return"]) == ["    "] * 2


def test_relative_drop():
    assert relative_drop(0.8, 0.2) == pytest.approx(0.75)
    assert relative_drop(0.5, 0.5) == 0.0
    assert relative_drop(0.5, 0.6) == pytest.approx(-0.2)
    assert relative_drop(0.0, 0.0) == 0.0
    assert math.isnan(relative_drop(0.0, 0.3))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("She pays $1,234.50 in total", "1234.5"),
        ("first 3 then 7\n", "7"),
        ("It costs $18.00.", "18"),
        ("-5 degrees", "-5"),
        ("so #### 1,000\n\nQuestion: 3 more", "1000"),
        ("no numbers here", None),
        # a hyphen after a number is a range or a subtraction, not a sign (found by a review)
        ("in the years 2019-2020", "2020"),
        ("Total = 12 - 4", "4"),
        ("x = -5", "-5"),
        ("it cost -$5", "-5"),
        # a decimal without its leading zero was read as the integer after the point (a review: ".5" matched 5)
        ("It is .5", "0.5"),
        ("a drop of -.25 then", "-0.25"),
        ("It was 3.5.", "3.5"),
        ("Total: 7...5 items?", "5"),  # an ellipsis is no decimal point (a review of the mend)
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_gsm8k_exact_match():
    items = get_skill("gsm8k", shared_data_dir()).eval_items(3)
    assert extract_gsm8k_reference(items[0].answer) == "18"
    preds = ["Janet makes $18 every day.", "It takes 3 bolts.", "The answer is 1,000,000."]
    result = gsm8k_exact_match(preds, items)
    assert result.per_item == [1.0, 1.0, 0.0] and result.score == pytest.approx(2 / 3)
    assert extract_gsm8k_reference("blah #### 1,234") == "1234"
    with pytest.raises(ValueError, match="####"):
        gsm8k_exact_match(["1"], ["no final answer"])
    with pytest.raises(ValueError, match="predictions"):
        gsm8k_exact_match(["1", "2"], items[:1])


def test_pass_at_1_humaneval_canonical_solutions_pass():
    items = get_skill("humaneval", shared_data_dir()).eval_items()[::4]
    assert len(items) >= 20
    result = pass_at_1(items, [it.answer for it in items], timeout=20, allow_code_execution=True)
    assert result.score == 1.0, [s for s in result.details["status"]]


def test_pass_at_1_mbpp_and_failures():
    mbpp = get_skill("mbpp", shared_data_dir()).eval_items(3)
    human = get_skill("humaneval", shared_data_dir()).eval_items(1)[0]
    assert "\r" not in build_program(mbpp[0], mbpp[0].completion)
    completions = [
        mbpp[0].completion,  # canonical code after "Answer:" (leading space stripped)
        "```python\n" + mbpp[1].answer + "\n```",  # fenced code is extracted
        "def nothing(:\n",  # syntax error
    ]
    result = pass_at_1(mbpp, completions, timeout=10, allow_code_execution=True)
    assert result.per_item == [1.0, 1.0, 0.0]
    assert result.details["status"] == ["passed", "passed", "failed"]
    broken = pass_at_1(
        [human] * 4,
        [
            "    return not True\n",  # wrong answer
            "    while True:\n        pass\n",  # infinite loop
            "    import socket\n    socket.create_connection(('93.184.216.34', 80))\n    return False\n",
            "    import sys\n    sys.exit(0)\n",  # leaves before the tests; must not count as a pass
        ],
        timeout=3,
        allow_code_execution=True,
    )
    assert broken.per_item == [0.0, 0.0, 0.0, 0.0]
    assert broken.details["status"][1] == "timeout"


def test_run_program_sandbox():
    assert run_program("print('ok')", allow_code_execution=True).passed
    net = run_program("import socket\ns = socket.socket()\n", allow_code_execution=True)
    assert not net.passed and "disabled" in net.stderr
    sub = run_program("import subprocess\nsubprocess.run(['echo', 'hi'])\n", allow_code_execution=True)
    assert not sub.passed
    mem = run_program("x = bytearray(3 * 1024**3)\n", memory_mb=512, allow_code_execution=True)
    assert not mem.passed and "MemoryError" in mem.stderr
    cwd = run_program(
        f"import os\nopen('f.txt', 'w').write('x')\nassert os.getcwd() != {str(Path.cwd())!r}\n",
        allow_code_execution=True,
    )
    assert cwd.passed and not Path("f.txt").exists()


def test_report_files(tmp_path, monkeypatch, caplog):
    base = MetricResult("answer_token_accuracy", 0.64, 10, per_item=[0.5] * 10, abstained=[False] * 10)
    scores = {
        "base": {"gsm8k": base, "mbpp": 0.69, "mmlu": 0.25},
        "ksd": {"gsm8k": 0.064, "mbpp": 0.66, "mmlu": 0.25},
        "na": {"gsm8k": 0.32, "mbpp": float("nan")},
    }
    report = build_report(scores, metadata={"model": "tiny"})
    assert report["baseline"] == "base" and report["skills"] == ["gsm8k", "mbpp", "mmlu"]
    assert report["relative_drop"]["ksd"]["gsm8k"] == pytest.approx(0.9)
    assert report["relative_drop"]["na"]["mbpp"] is None and report["scores"]["na"]["mmlu"] is None
    paths = save_report(report, tmp_path / "out")
    loaded = load_json(paths["json"])
    assert loaded == json.loads(json.dumps(report))
    assert loaded["metrics"]["base"]["gsm8k"]["score"] == 0.64
    md = paths["markdown"].read_text()
    assert md == markdown_table(report)
    lines = md.strip().splitlines()
    assert lines[0] == "| skill | base (baseline) | ksd | na |" and len(lines) == 5
    assert "| gsm8k | 0.640 | 0.064 (drop 90.0%) | 0.320 (drop 50.0%) |" in lines
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    # plot=None (the demo's): the chart only where matplotlib is installed; without it the rest is written (the
    # demo failed after every fit without matplotlib, a review)
    assert "png" in save_report(report, tmp_path / "auto", plot=None)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else find_spec(n, *a)
    )
    with caplog.at_level("WARNING", logger="unlearn_hf"):
        paths = save_report(report, tmp_path / "no-plot", plot=None)
    assert sorted(paths) == ["json", "markdown"] and "matplotlib is not installed" in caplog.text
    assert sorted(p.name for p in (tmp_path / "no-plot").iterdir()) == ["report.json", "report.md"]
    with pytest.raises(ValueError, match="Baseline"):
        build_report(scores, baseline="nope")


def test_a_report_of_one_model_in_several_formats_has_no_drops():
    """``unlearn-hf evaluate`` printed the chat format's score as a "drop" from the same model's QA score, and the
    QA column as "(baseline)" (a review): formats of one model are not a model and its variants."""
    scores = {"m [qa]": {"gsm8k": 0.5, "mbpp": 0.4}, "m [chat]": {"gsm8k": 0.25, "mbpp": 0.4}}
    report = build_report(scores, relative=False)
    assert report["baseline"] is None and report["relative_drop"] == {}
    table = markdown_table(report)
    assert "drop" not in table and "baseline" not in table and "0.250" in table
    assert build_report(scores)["relative_drop"] == {"m [chat]": {"gsm8k": 0.5, "mbpp": 0.0}}
    with pytest.raises(ValueError, match="a report without drops has no baseline"):
        build_report(scores, baseline="m [qa]", relative=False)


def test_abstention_is_measured_on_the_items_each_skill_is_scored_on(shared_data, monkeypatch):
    """The demo scores MMLU on fewer items than the other skills: its abstention rate was measured on as many items as
    the largest skill's (50 where 40 were scored), a rate the 40 scored items could not give (a review)."""
    import unlearn_hf.evaluation.runner as runner

    seen = {}

    def rate(model, tokenizer, prompts, batch_size=8):
        seen[len(seen)] = prompts
        return len(prompts)

    monkeypatch.setattr(runner, "abstention_rate", rate)
    skills = [get_skill("gsm8k", shared_data), get_skill("mmlu", shared_data)]
    model = type("Abstaining", (), {"has_abstention": True})()
    assert runner.abstention_rates(model, None, skills, {"gsm8k": 5, "mmlu": 3}) == {"gsm8k": 5, "mmlu": 3}
    assert runner.abstention_rates(model, None, skills, 4) == {"gsm8k": 4, "mmlu": 4}
    first = [runner.render_item(i, None, "qa").prompt for i in skills[1].eval_items(3)]
    assert seen[1] == first  # the first items, the ones scored
