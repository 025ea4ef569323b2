"""lm-evaluation-harness on unlearned models (``unlearn_hf.integrations.lm_eval``), offline, on local YAML tasks
built from the shared data sets, with a tiny model whose forget queries Key Space Detection separates.

Every check compares against an independent run: ``detect`` on the context's own tokens for the decision, lm-eval's
plain ``HFLM`` on the base model for the answered requests' scores, the refusal's text for generations.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_data import REPO_ROOT
from helpers_ksd import FORGET, N_LAYERS, separable_ksd
from helpers_lm_eval import (
    generation_task,
    loglikelihood_task,
    mbpp_texts,
    mc_task,
    mmlu_rows,
    rolling_task,
    sum_choices,
)
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from tiny_models import tiny_llama

from benchmarks.lm_eval_formats import evaluate
from unlearn_hf import KeySpaceDetectionConfig, NeuronAdjustConfig, UnlearnedModelForCausalLM
from unlearn_hf.cli.main import main
from unlearn_hf.integrations.lm_eval.model import UnlearnedLM

REFUSAL = "I can't help with that."
N_FORGET = 8


@pytest.fixture(scope="module")
def tok(smollm2):
    return copy.deepcopy(smollm2[1])


@pytest.fixture(scope="module")
def setup(tok):
    return separable_ksd(tok, REFUSAL)


def forget_docs() -> list[dict]:
    """The fitted arithmetic questions as multiple choice, the gold answer at every position (0 included)."""
    docs = []
    for i, q in enumerate(FORGET[:N_FORGET]):
        a, b = map(int, re.findall(r"\d+", q))
        docs.append({"question": q, **sum_choices(a, b, i % 4)})
    return docs


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    retain = mmlu_rows("high_school_geography", 6, shared_data)
    return {
        "mc": mc_task(folder, forget_docs(), retain),
        "gen": generation_task(folder, FORGET[:3], mbpp_texts(3, shared_data)),
        "ll": loglikelihood_task(folder, FORGET[:3], mbpp_texts(3, shared_data)),
        "rolling": rolling_task(folder, FORGET[:3], mbpp_texts(3, shared_data)),
        "mutual": mc_task(
            folder,
            forget_docs(),
            retain,
            name="ul_mutual",
            metrics="metric_list:\n  - metric: acc\n  - metric: acc_mutual_info\n",
        ),
    }


def run(lm, *paths):
    return evaluate(lm, list(paths), chat=False)


def expected_abstention(unlearned, tok, contexts: list[str]) -> list[bool]:
    """The independent decision: ``detect`` on each context's tokens alone."""
    return [bool(unlearned.detect(torch.tensor([tok(c)["input_ids"]]))[0]) for c in contexts]


def test_registered_under_its_name_with_lm_evals_own_models():
    from lm_eval.api.registry import get_model

    assert get_model("unlearn_hf") is UnlearnedLM
    assert get_model("hf") is HFLM


@pytest.mark.parametrize("side", ["left", "right"])
def test_multiple_choice_abstained_items_are_wrong_at_every_batch_size(setup, tok, tasks, side):
    model, unlearned = setup
    tok = copy.deepcopy(tok)
    tok.padding_side = side
    docs = [json.loads(line) for line in tasks["mc"].with_suffix(".jsonl").read_text().splitlines()]
    expected = expected_abstention(unlearned, tok, [d["question"] for d in docs])
    assert expected[:N_FORGET] == [True] * N_FORGET and not all(expected[N_FORGET:])
    for batch_size in (1, 4, 16, "auto"):  # auto: lm-eval probes the largest batch, up to max_batch_size
        size = {"batch_size": batch_size, "max_batch_size": 8}
        out = run(UnlearnedLM(pretrained=unlearned, tokenizer=tok, **size), tasks["mc"])
        base = run(HFLM(pretrained=model, tokenizer=tok, **size), tasks["mc"])
        samples, base_samples = out["samples"]["ul_mc"], base["samples"]["ul_mc"]
        assert [s["abstained"] for s in samples] == [float(e) for e in expected], batch_size
        for s, b, refused in zip(samples, base_samples, expected):
            if refused:  # scored as a wrong choice, whatever the gold position (0 included)
                assert s["acc"] == 0.0 and s["acc_norm"] == 0.0
                assert all(r[0][0] == -math.inf for r in s["resps"])
            else:  # exactly the base model's scores in the same batches
                assert [r[0] for r in s["resps"]] == [r[0] for r in b["resps"]]
                assert (s["acc"], s["acc_norm"]) == (b["acc"], b["acc_norm"])
        result = out["results"]["ul_mc"]
        assert result["abstained,none"] == pytest.approx(sum(expected) / len(expected))
        answered = [b["acc"] for b, e in zip(base_samples, expected) if not e]
        assert result["acc,none"] == pytest.approx(sum(answered) / len(expected))
        assert "abstained,none" not in base["results"]["ul_mc"]  # other models' tasks are left alone
        assert out["higher_is_better"]["ul_mc"]["abstained"] is False


def test_a_run_resumed_from_lm_evals_cache_scores_what_an_uncached_run_scores(setup, tok, tasks, tmp_path):
    """--use_cache stored HFLM's values as it computed them, before the decision: a run interrupted and resumed from
    the cache scored refused documents as answered (a review). The interruption is a KeyboardInterrupt in the
    scoring forwards, after some of them."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _, unlearned = setup

    def evaluate_cached(lm, task):
        return simple_evaluate(
            model=lm,
            tasks=[str(tasks[task])],
            task_manager=TaskManager(include_defaults=False),
            bootstrap_iters=0,
            use_cache=str(tmp_path / f"cache_{task}"),
        )["results"]

    def lm():
        return UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=1)

    real, calls, stop = HFLM._model_call, [0], [math.inf]

    def counted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] >= stop[0]:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    for task in ("mc", "rolling"):
        calls[0], stop[0], HFLM._model_call = 0, math.inf, counted
        try:
            expected = run(lm(), tasks[task])["results"]
        finally:
            HFLM._model_call = real
        assert expected[f"ul_{task}"]["abstained,none"] > 0
        # interrupted at the last forward: every request but one was scored (the short forget ones come last)
        calls[0], stop[0], HFLM._model_call = 0, calls[0], counted
        try:
            with pytest.raises(KeyboardInterrupt):
                evaluate_cached(lm(), task)
        finally:
            HFLM._model_call = real
        assert evaluate_cached(lm(), task) == expected  # resumed: the cached requests and the rest
        assert evaluate_cached(lm(), task) == expected  # every request from the cache


def test_generate_until_returns_the_refusal_and_the_base_models_answers(setup, tok, tasks):
    model, unlearned = setup
    out = run(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=1), tasks["gen"])
    base = run(HFLM(pretrained=model, tokenizer=tok, batch_size=1), tasks["gen"])
    expected = expected_abstention(unlearned, tok, [s["doc"]["question"] for s in out["samples"]["ul_gen"]])
    assert expected == [True] * 3 + [False] * 3
    for s, b, refused in zip(out["samples"]["ul_gen"], base["samples"]["ul_gen"], expected):
        assert s["abstained"] == float(refused)
        assert s["resps"] == ([[REFUSAL]] if refused else b["resps"])
    assert out["results"]["ul_gen"]["abstained,none"] == 0.5


def test_loglikelihood_of_an_abstained_context_is_minus_infinity(setup, tok, tasks):
    model, unlearned = setup
    out = run(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=2), tasks["ll"])
    base = run(HFLM(pretrained=model, tokenizer=tok, batch_size=2), tasks["ll"])
    for s, b in zip(out["samples"]["ul_ll"], base["samples"]["ul_ll"]):
        if s["abstained"]:
            assert s["resps"] == [[(-math.inf, False)]] and s["acc"] == 0
        else:
            assert s["resps"] == b["resps"]
    assert [s["abstained"] for s in out["samples"]["ul_ll"]] == [1.0] * 3 + [0.0] * 3
    assert out["results"]["ul_ll"]["perplexity,none"] == math.inf


def test_mutual_information_accuracy_of_abstained_items_is_wrong(setup, tok, tasks):
    """With ``acc_mutual_info`` lm-eval adds one unconditional request per choice (empty context: never refused);
    the refused conditional ones still make the document wrong, the gold at position 0 included."""
    model, unlearned = setup
    out = run(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=4), tasks["mutual"])
    base = run(HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks["mutual"])
    samples = out["samples"]["ul_mutual"]
    assert [s["abstained"] for s in samples[:N_FORGET]] == [1.0] * N_FORGET
    assert all(s["acc"] == 0 and s["acc_mutual_info"] == 0 for s in samples[:N_FORGET])
    for s, b in zip(samples, base["samples"]["ul_mutual"]):
        assert len(s["resps"]) == 8  # four conditional, four unconditional requests
        assert [r[0] for r in s["resps"][4:]] == [r[0] for r in b["resps"][4:]]  # unconditional: answered
        if not s["abstained"]:
            assert (s["acc"], s["acc_mutual_info"]) == (b["acc"], b["acc_mutual_info"])


@pytest.mark.parametrize("max_length", [12, 2048])
def test_loglikelihood_decides_on_the_context_as_lm_eval_feeds_it(setup, tok, max_length):
    """A request longer than max_length loses the start of its context in the scored forward: the decision reads
    the same tokens (it read the context's last max_length tokens, which the forward never saw; a review)."""
    from lm_eval.api.instance import Instance

    _, unlearned = setup
    lm = UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=1, max_length=max_length)
    fed, decided = [], []
    call, decide = lm._model_call, lm.abstainers
    lm._model_call = lambda inps, *a, **k: fed.append(inps[0].tolist()) or call(inps, *a, **k)
    lm.abstainers = lambda tokens: decided.append(list(tokens)) or decide(tokens)
    pairs = [(q, " The answer is 42.") for q in FORGET[:2]]
    requests = [Instance("loglikelihood", {}, pair, i, metadata=("t", i, 1)) for i, pair in enumerate(pairs)]
    lm.loglikelihood(requests, disable_tqdm=True)
    n_cont = len(tok(pairs[0][1], add_special_tokens=False)["input_ids"])
    # the context part of each fed row: all but the continuation's tokens (its last one is not fed)
    contexts = sorted(row[: len(row) - (n_cont - 1)] for row in fed)
    assert sorted(decided) == contexts
    full = [len(tok(q)["input_ids"]) for q, _ in pairs]
    assert [len(c) for c in sorted(decided, key=len)] == sorted(min(n, max_length + 1 - n_cont) for n in full)


def test_a_context_holding_the_pad_tokens_id_is_decided_on_every_token(setup, tok):
    """lm-eval feeds every token of a context, the pad token's id too; the decision was made without a mask, so
    detect inferred one from the pad id as generate does and left those tokens out (here ":" as the pad token: the
    questions, decided at "Answer" instead of ":", were answered; a review)."""
    _, unlearned = setup
    lm = UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=1)
    colon = tok(":", add_special_tokens=False)["input_ids"][-1]
    old = unlearned.generation_config.pad_token_id
    unlearned.generation_config.pad_token_id = colon
    try:
        for question in FORGET[:3]:
            ids = lm.tok_encode(question)
            row = torch.tensor([ids])
            assert colon in ids and not bool(
                unlearned.detect(row)[0]
            )  # the premise: a mask inferred, answered
            assert bool(unlearned.detect(row, attention_mask=torch.ones_like(row))[0])
            assert lm.abstainers(ids) == ("key_space_detection",)
    finally:
        unlearned.generation_config.pad_token_id = old


def test_rolling_loglikelihood_decides_on_the_text_itself(setup, tok, tasks):
    model, unlearned = setup
    out = run(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=2), tasks["rolling"])
    base = run(HFLM(pretrained=model, tokenizer=tok, batch_size=2), tasks["rolling"])
    samples = out["samples"]["ul_rolling"]
    expected = expected_abstention(unlearned, tok, [s["doc"]["text"] for s in samples])
    assert expected == [True] * 3 + [False] * 3
    for s, b, refused in zip(samples, base["samples"]["ul_rolling"], expected):
        assert s["abstained"] == float(refused)
        assert s["resps"] == ([[-math.inf]] if refused else b["resps"])
    assert out["results"]["ul_rolling"]["word_perplexity,none"] == math.inf


def test_neuron_adjust_scores_do_not_depend_on_the_batch_size(tok, tasks, shared_data, tmp_path):
    """Random replacement draws depend on the batch shape (the issue's −24.07 vs −23.29); the lm-eval model
    scores with deterministic replacement, and leaves the method list as it was (same names, same order)."""
    unlearned = UnlearnedModelForCausalLM.from_base(tiny_llama(layers=N_LAYERS, seed=3))
    retain = mbpp_texts(12, shared_data)
    unlearned.fit(
        NeuronAdjustConfig(ratio=0.3), forget=FORGET, retain=retain, tokenizer=tok, show_progress=False
    )
    unlearned.fit(
        KeySpaceDetectionConfig(layers=[1], alpha=1.5), forget=FORGET, tokenizer=tok, show_progress=False
    )
    names = list(unlearned.methods)

    def scores(lm, batch_size):
        lm.batch_size_per_gpu = batch_size
        return [s["resps"] for s in run(lm, tasks["mc"])["samples"]["ul_mc"]]

    with pytest.raises(OSError):  # a failed construction leaves the model as it was
        UnlearnedLM(pretrained=unlearned, tokenizer=str(tmp_path / "no-such-tokenizer"))
    assert not unlearned.methods[names[0]].config.deterministic
    random_lm = UnlearnedLM(
        pretrained=copy.deepcopy(unlearned), tokenizer=tok, deterministic_neuron_adjust=False
    )
    a, b = scores(random_lm, 1), scores(random_lm, 4)
    assert a != b  # the draws follow the batch shape
    before = (dict(unlearned.methods), dict(unlearned.attachments))
    lm = UnlearnedLM(pretrained=unlearned, tokenizer=tok)
    seen = []  # the methods while lm-eval scores
    call = lm._model_call
    lm._model_call = lambda *a, **k: (
        seen.append(
            (
                (dict(unlearned.methods), dict(unlearned.attachments)),
                unlearned.methods[names[0]].deterministic_now,
            )
        )
        or call(*a, **k)
    )
    one, four = scores(lm, 1), scores(lm, 4)
    assert seen and all(attached == before and now for attached, now in seen)  # nothing re-attached (reviews)
    # after the evaluation the user's model draws again: the switch held for the scoring calls only
    assert not unlearned.methods[names[0]].deterministic_now
    flat = [(x[0][0], y[0][0]) for p, q in zip(one, four) for x, y in zip(p, q)]
    assert all(
        x == y or abs(x - y) <= 1e-4 * abs(x) for x, y in flat
    )  # float rounding of batched matmuls only


def test_refuses_plain_models_and_unsupported_arguments(setup, tok):
    model, unlearned = setup
    with pytest.raises(TypeError, match="'hf' model"):
        UnlearnedLM(pretrained=model, tokenizer=tok)
    with pytest.raises(ValueError, match="parallelize"):
        UnlearnedLM(pretrained=unlearned, tokenizer=tok, parallelize=True)


@pytest.fixture(scope="module")
def saved(setup, tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("unlearned")
    setup[1].save_pretrained(folder, save_base_model=True, tokenizer=tok)
    return folder


def test_loads_a_checkpoint_folder_and_refuses_a_plain_one(saved, setup, tok, tasks, tmp_path):
    lm = UnlearnedLM(pretrained=str(saved), dtype="float32", device="cpu", batch_size=4)
    out = run(lm, tasks["mc"])
    assert out["results"]["ul_mc"]["abstained,none"] == pytest.approx(N_FORGET / 14)
    assert out["config"]["unlearn_hf_methods"] == {"key_space_detection": "key_space_detection"}
    setup[0].save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not an unlearned model"):
        UnlearnedLM(pretrained=str(tmp_path / "plain"), device="cpu")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):  # it said "not an unlearned model"
        UnlearnedLM(pretrained=str(tmp_path / "missing"), device="cpu")
    # a pathlib.Path is a folder too (it was refused as "pretrained must be an unlearned checkpoint"; a review)
    by_path = UnlearnedLM(pretrained=saved, dtype="float32", device="cpu", batch_size=4)
    assert run(by_path, tasks["mc"])["results"] == out["results"]


def test_loads_an_unlearned_hub_repo_with_its_tokenizer(setup, tok, tasks, tmp_path):
    """The Hub path for real: pushed to a loopback Hub, loaded by name (and a plain repo refused)."""
    from hub_server import hub_env, start_hub_server

    with (
        start_hub_server(tmp_path) as hub,
        hub_env(hub.endpoint, tmp_path / "cache", token="hf_lm_eval_token"),
    ):
        setup[1].push_to_hub(
            "test-user/tiny-no-math",
            save_base_model=True,
            tokenizer=tok,
            base_model_name_or_path="test-user/tiny-origin",
            forget_skill="arithmetic",
        )
        setup[0].push_to_hub("test-user/tiny-plain")
        lm = UnlearnedLM(pretrained="test-user/tiny-no-math", device="cpu", dtype="float32", batch_size=4)
        assert lm.tokenizer.get_vocab() == tok.get_vocab()
        out = run(lm, tasks["mc"])
        with pytest.raises(ValueError, match="not an unlearned model"):
            UnlearnedLM(pretrained="test-user/tiny-plain", device="cpu")
    assert out["results"]["ul_mc"]["abstained,none"] == pytest.approx(N_FORGET / 14)


def test_cli_evaluate_with_lm_eval_writes_both_reports(saved, tasks, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(
        [
            "evaluate",
            "--harness",
            "lm-eval",
            "--model",
            str(saved),
            "--tasks",
            f"{tasks['mc']},{tasks['gen']}",
        ]
        + ["--formats", "qa,chat", "--batch-size", "4", "--output", str(out), "--quiet"]
    )
    assert code == 0
    report = json.loads(out.read_text())
    scores = report["scores"][f"{saved} [qa]"]
    assert scores["ul_mc abstained"] == pytest.approx(N_FORGET / 14)
    assert scores["ul_gen abstained"] == 0.5
    chat = report["scores"][
        f"{saved} [chat]"
    ]  # the same tasks through the chat template: a decision per prompt
    assert set(chat) == set(scores) and 0 <= chat["ul_mc abstained"] <= 1
    lm_eval_json = json.loads((tmp_path / "report.lm_eval.json").read_text())
    assert lm_eval_json["qa"]["results"]["ul_mc"]["abstained,none"] == pytest.approx(N_FORGET / 14)
    assert lm_eval_json["chat"]["config"]["unlearn_hf_methods"] == {
        "key_space_detection": "key_space_detection"
    }
    assert "ul_mc abstained" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "needs --tasks"),
        (["--tasks", "no/such/task.yaml"], "no such YAML file"),
        (["--tasks", "TASK", "--num-fewshot", "50"], "more few-shot documents"),
        (["--tasks", "TASK", "--num-fewshot", "-1"], "--num-fewshot"),
        # the native harness's options were silently ignored (a review)
        (
            ["--tasks", "TASK", "--skills", "gsm8k", "--n-eval", "3"],
            "--skills, --n-eval: options of the native",
        ),
        (["--tasks", "TASK", "--data-dir", "."], "--data-dir: options of the native harness"),
    ],
)
def test_cli_lm_eval_user_errors_are_one_line(saved, tasks, extra, message, capsys):
    extra = [str(tasks["mc"]) if e == "TASK" else e for e in extra]
    try:
        code = main(
            ["evaluate", "--harness", "lm-eval", "--model", str(saved), "--formats", "qa", "--quiet", *extra]
        )
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # not lm-eval's bars
    assert code == 2 and len(errors) == 1 and message in errors[0]


def test_cli_unknown_task_is_refused_before_the_model_loads(saved, tasks, monkeypatch, capsys, tmp_path):
    """A misspelt task name failed only after the model was loaded (minutes for a Hub model): now it is refused
    first, naming the name that matches no task (a YAML path beside it is fine)."""
    from unlearn_hf.cli import harness

    loads = []
    monkeypatch.setattr(harness, "load_model", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    # a glob pattern too: lm-eval's evaluation does not expand it (it failed after the model load; a review)
    code = main(
        ["evaluate", "--harness", "lm-eval", "--model", str(saved), "--formats", "qa", "--quiet"]
        + ["--tasks", f"{tasks['mc']},gsm8k_typo_task,gsm8k*"]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and not loads and len(errors) == 1
    named = errors[0].split("no task named ")[1]
    assert named.startswith("gsm8k_typo_task, gsm8k* (") and str(tasks["mc"]) not in named
    # a task file whose name does not end in a lower-case .yaml is still a file (lm-eval loads it)
    from unlearn_hf.integrations.lm_eval.run import task_manager_for

    upper = tmp_path / "task.YAML"
    upper.write_text(Path(tasks["mc"]).read_text())
    task_manager_for([str(upper)])


def test_cli_tasks_without_the_lm_eval_harness_is_an_error(capsys):
    assert main(["evaluate", "--tasks", "mmlu", "--quiet"]) == 2
    assert "--harness lm-eval" in capsys.readouterr().err


def test_launcher_runs_lm_evals_command_line_with_the_model_registered(saved, tasks, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "unlearn_hf.integrations.lm_eval", "--model", "unlearn_hf"]
    cmd += ["--model_args", f"pretrained={saved},dtype=float32", "--tasks", str(tasks["mc"])]
    cmd += ["--device", "cpu", "--batch_size", "4", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = list(out.rglob("results_*.json"))
    assert len(written) == 1
    result = json.loads(written[0].read_text())["results"]["ul_mc"]
    assert result["abstained,none"] == pytest.approx(N_FORGET / 14)


# --- found by review: each test fails without its fix -----------------------------------------------------------


def test_abstained_items_are_wrong_for_every_multiple_choice_metric(setup, tok, tmp_path):
    """brier_score once crashed the run, and with only acc_bytes a refusal of a gold-A question counted correct."""
    _, unlearned = setup
    metrics = "metric_list:\n  - metric: acc_bytes\n  - metric: brier_score\n  - metric: f1\n"
    forget = [dict(d, answer=0) for d in forget_docs()]  # gold A everywhere: the argmax-over--inf trap
    path = mc_task(tmp_path, forget, [], name="ul_gold_a", metrics=metrics)
    samples = run(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=4), path)["samples"][
        "ul_gold_a"
    ]
    for s in samples:
        assert s["abstained"] == 1.0 and s["acc_bytes"] == 0.0
        gold, pred = s["f1"]
        assert gold == 0 and pred != 0


def test_generation_with_recheck_each_token_is_what_generate_emits(tok, tmp_path):
    """A rechecking method may start refusing mid-answer: lm-eval gets generate's text and counts it abstained."""
    model, unlearned = separable_ksd(tok, REFUSAL, recheck_each_token=True)
    ids = tok(FORGET[0])["input_ids"]
    prompt = tok.decode(ids[:-1])  # the forget question without its last token, which the model then writes

    def write_next(module, args, out):
        forced = torch.full_like(out, -1e4)
        forced[..., ids[-1]] = 0.0
        return forced

    model.lm_head.register_forward_hook(write_next)
    assert not bool(unlearned.detect(torch.tensor([ids[:-1]]))[0])  # not refused at the prefill
    batch = tok(prompt, return_tensors="pt")
    out = unlearned.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    emitted = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert REFUSAL in emitted
    path = generation_task(tmp_path, [prompt], [], name="ul_recheck")
    path.write_text(path.read_text().replace("max_gen_toks: 10", "max_gen_toks: 12"))
    sample = run(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=1), path)["samples"][
        "ul_recheck"
    ][0]
    assert sample["resps"] == [[emitted]] and sample["abstained"] == 1.0


# lm-eval reads the budget from max_gen_toks or an alias (tasks use max_new_tokens): the alias was ignored, the
# refusal kept the default 256 tokens and the decision read the context cut for them (a review)
@pytest.mark.parametrize("key", ["max_gen_toks", "max_new_tokens", "max_tokens"])
def test_refusal_is_cut_to_the_requests_token_budget(setup, tok, tmp_path, key):
    _, unlearned = setup
    path = generation_task(tmp_path, FORGET[:1], [], name="ul_short")
    path.write_text(path.read_text().replace("max_gen_toks: 10", f"{key}: 3"))
    sample = run(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=1), path)["samples"]["ul_short"][
        0
    ]
    batch = tok(FORGET[0], return_tensors="pt")
    out = unlearned.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    assert sample["resps"] == [[tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)]]


def test_a_task_object_evaluated_again_by_another_model_keeps_nothing_of_the_abstention(setup, tok, tasks):
    from lm_eval.tasks import TaskManager

    model, unlearned = setup
    manager = TaskManager(include_defaults=False)
    task_objects = list(manager.load([str(tasks["mc"])])["tasks"].values())

    def on_the_same_task_objects(lm):
        return simple_evaluate(model=lm, tasks=task_objects, task_manager=manager, bootstrap_iters=0)

    first = on_the_same_task_objects(UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=4))
    again = on_the_same_task_objects(HFLM(pretrained=model, tokenizer=tok, batch_size=4))
    fresh = run(HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks["mc"])
    assert "abstained,none" in first["results"]["ul_mc"]
    assert again["results"]["ul_mc"] == fresh["results"]["ul_mc"]
    assert again["higher_is_better"]["ul_mc"] == fresh["higher_is_better"]["ul_mc"]


def test_decisions_follow_methods_attached_after_the_lm_was_made(tok):
    unlearned = UnlearnedModelForCausalLM.from_base(tiny_llama(layers=N_LAYERS))
    lm = UnlearnedLM(pretrained=unlearned, tokenizer=tok)
    ids = tok(FORGET[0])["input_ids"]
    assert lm.abstainers(ids) == ()
    unlearned.fit(
        KeySpaceDetectionConfig(layers=[1], alpha=1.5), forget=FORGET, tokenizer=tok, show_progress=False
    )
    assert lm.abstainers(ids) == ("key_space_detection",)


def test_a_group_reports_the_share_of_all_its_documents_abstained_on(setup, tok, tasks):
    from lm_eval.tasks import TaskManager

    _, unlearned = setup
    folder = tasks["mc"].parent
    (folder / "ul_group.yaml").write_text(
        "group: ul_group\ntask: [ul_mc, ul_ll]\naggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n"
    )
    lm = UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=4)
    out = simple_evaluate(
        model=lm,
        tasks=["ul_group"],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
    )
    results = out["results"]
    assert results["ul_mc"]["abstained,none"] == pytest.approx(8 / 14)
    assert results["ul_ll"]["abstained,none"] == pytest.approx(3 / 6)
    assert results["ul_group"]["abstained,none"] == pytest.approx((8 + 3) / (14 + 6))


def test_gold_of_any_integer_type_or_a_custom_scorer_still_scores_the_refusal_wrong(setup, tok, tmp_path):
    """Second review: a numpy-integer or bool gold, or a task scoring with its own process_results, made the
    chosen 'wrong' choice the gold one."""
    import numpy as np

    from unlearn_hf.integrations.lm_eval.scoring import wrong_choice

    class Task:  # what wrong_choice reads of an lm-eval task
        multiple_input = False
        _metric_fn_list = {"acc": None}

        def __init__(self, gold):
            self.gold = gold

        def doc_to_choice(self, doc):
            return ["w", "x", "y", "z"]

        def doc_to_target(self, doc):
            return self.gold

    def lm_eval_acc(gold):  # lm-eval's comparison: pred == gold
        return lambda doc, results: {"acc": float(int(np.argmax([r[0] for r in results])) == gold)}

    refused = [(-math.inf, False)] * 4

    def chosen(scorer, gold) -> int:
        return int(np.argmax([r[0] for r in wrong_choice(scorer, {}, refused, Task(gold))]))

    for gold in (np.int64(0), False, 0, "w"):  # all mean choice 0 to lm-eval
        assert chosen(lm_eval_acc(0), gold) != 0, gold
    assert chosen(lambda doc, results: {"acc": 0.0}, [0, 1]) not in (0, 1)

    def own_scorer(doc, results):  # a custom process_results whose gold (choice 2) is not doc_to_target's
        return {"acc": float(int(np.argmax([r[0] for r in results])) == 2)}

    picked = wrong_choice(own_scorer, {}, refused, Task(0))
    assert own_scorer({}, picked)["acc"] == 0.0


def test_a_users_own_process_results_survives_our_scoring(setup, tok, tasks):
    from lm_eval.tasks import TaskManager

    model, unlearned = setup
    manager = TaskManager(include_defaults=False)
    task = next(iter(manager.load([str(tasks["mc"])])["tasks"].values()))
    task.process_results = lambda doc, results: {"acc": 42.0}
    for lm in (UnlearnedLM(pretrained=unlearned, tokenizer=tok), HFLM(pretrained=model, tokenizer=tok)):
        out = simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0)
        assert out["results"]["ul_mc"]["acc,none"] == 42.0


def test_decisions_made_inside_disable_unlearning_do_not_outlive_it(setup, tok):
    _, unlearned = setup
    lm = UnlearnedLM(pretrained=unlearned, tokenizer=tok)
    ids = tok(FORGET[0])["input_ids"]
    with unlearned.disable_unlearning():
        assert lm.abstainers(ids) == ()
    assert lm.abstainers(ids) == ("key_space_detection",)
