"""The unlearn-hf command line end to end on a tiny model, its user errors, and a short demo on SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import tiny_llama

from unlearn_hf import UnlearnedModelForCausalLM, __version__
from unlearn_hf.cli.main import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(layers=4).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unlearn_hf.cli.main", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("command", ["fit", "demo"])
def test_ratio_grid_is_the_grid_the_fit_searches(command, tiny_dir, shared_data, tmp_path, monkeypatch):
    """``--ratio-grid`` reaches the config each of Neuron Adjust and Selective Pruning is fitted with (sorted);
    the short demo on SmolLM2 below searches a grid given so."""
    seen = []

    def fit(self, config, *args, **kwargs):
        seen.append(config)
        raise ValueError("stopped after the config")

    monkeypatch.setattr(UnlearnedModelForCausalLM, "fit", fit)
    args = [command, "--model", str(tiny_dir), "--forget", "gsm8k", "--ratio-grid", "0.2,0.05"]
    args += ["--data-dir", str(shared_data), "--output", str(tmp_path / "out"), "-q"]
    args += (
        ["--method", "sp"] if command == "fit" else ["--methods", "na", "--n-eval", "1", "--n-eval-mmlu", "1"]
    )
    assert main(args) != 0
    assert [c.ratio_grid for c in seen] == [[0.05, 0.2]] and seen[0].ratio == "auto"
    assert seen[0].method_type == ("selective_pruning" if command == "fit" else "neuron_adjust")


def test_version_and_help():
    out = run_cli("--version")
    assert out.returncode == 0 and __version__ in out.stdout
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("fit", "evaluate", "generate", "push", "demo"):
        assert command in out.stdout


def test_fit_save_evaluate_generate(tiny_dir, shared_data, tmp_path, capsys):
    out_dir = tmp_path / "unlearned"
    data = ["--forget", "gsm8k", "--retain", "mbpp", "--n-probe", "8", "--ratio", "0.05"]
    data += ["--data-dir", str(shared_data)]
    fit = ["fit", "--model", str(tiny_dir)]
    code = main([*fit, "--method", "sp", "--method", "ksd", *data, "--output", str(out_dir), "--quiet"])
    assert code == 0
    assert (out_dir / "unlearn_config.json").is_file() and (out_dir / "unlearn_model.safetensors").is_file()
    config = json.loads((out_dir / "unlearn_config.json").read_text())
    assert json.dumps(config).count("selective_pruning") >= 1 and "key_space_detection" in json.dumps(config)
    # what the fit read is recorded (the card and `push` show it; it was null, a review)
    assert config["forget_data"] == f"8 gsm8k probe examples ({shared_data})"
    assert config["retain_data"] == f"8 examples of mbpp ({shared_data})"

    loaded = UnlearnedModelForCausalLM.from_pretrained(str(out_dir))
    assert set(loaded.methods) == {"selective_pruning", "key_space_detection"}
    # --deterministic reaches Neuron Adjust's config (a detection over random draws decides by the batch)
    na_dir = tmp_path / "na-det"
    assert main([*fit, "--method", "na", *data, "--deterministic", "--output", str(na_dir), "-q"]) == 0
    assert (
        UnlearnedModelForCausalLM.from_pretrained(str(na_dir)).methods["neuron_adjust"].config.deterministic
    )

    results = tmp_path / "results.json"
    code = main(
        [
            "evaluate",
            "--model",
            str(out_dir),
            "--skills",
            "gsm8k,mbpp",
            "--n-eval",
            "4",
            "--data-dir",
            str(shared_data),
            "--output",
            str(results),
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads(results.read_text())
    assert report["skills"] == ["gsm8k", "mbpp"]
    assert report["models"] == [f"{out_dir} [qa]", f"{out_dir} [chat]"]  # both prompt formats by default
    capsys.readouterr()

    # the CLI's score equals the library's own metric on the same items, in each format
    from unlearn_hf.evaluation import answer_token_accuracy, get_skill
    from unlearn_hf.evaluation.prompts import render_item

    tok = __import__("transformers").AutoTokenizer.from_pretrained(out_dir)
    items = get_skill("mbpp", shared_data).eval_items(4)
    for fmt in ("qa", "chat"):
        scores = report["scores"][f"{out_dir} [{fmt}]"]
        assert all(0.0 <= scores[s] <= 1.0 for s in ("gsm8k", "mbpp"))
        rendered = [render_item(i, tok, fmt) for i in items]
        assert scores["mbpp"] == pytest.approx(answer_token_accuracy(loaded, tok, rendered).score)

    code = main(
        ["generate", "--model", str(out_dir), "--prompt", "What is 2 + 2?", "--max-new-tokens", "5", "-q"]
    )
    assert code == 0
    generated = capsys.readouterr().out.strip()
    enc = tok("Question: What is 2 + 2?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        ref = loaded.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated == tok.decode(ref[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_cli_fits_exactly_as_the_api(tiny_dir, shared_data, tmp_path):
    """``unlearn-hf fit`` = ``unlearned.fit`` per method, in the order given, each on the model as it runs."""
    from transformers import AutoModelForCausalLM

    from unlearn_hf import KeySpaceDetectionConfig, NeuronAdjustConfig, SelectivePruningConfig
    from unlearn_hf.cli.recipes import retain_texts
    from unlearn_hf.evaluation import get_skill

    out_dir = tmp_path / "cli"
    args = ["fit", "--model", str(tiny_dir), "--forget", "gsm8k", "--retain", "mbpp", "--n-probe", "8"]
    args += ["--method", "na", "--method", "sp", "--method", "ksd", "--ratio", "0.05", "--seed", "4"]
    assert main([*args, "--data-dir", str(shared_data), "--output", str(out_dir), "--quiet"]) == 0
    cli = UnlearnedModelForCausalLM.from_pretrained(str(out_dir))

    tok = __import__("transformers").AutoTokenizer.from_pretrained(tiny_dir)
    forget, retain = get_skill("gsm8k", shared_data), [get_skill("mbpp", shared_data)]
    api = UnlearnedModelForCausalLM.from_base(AutoModelForCausalLM.from_pretrained(tiny_dir))
    kw = dict(tokenizer=tok, show_progress=False)
    api.fit(NeuronAdjustConfig(ratio=0.05, seed=4), forget.probe_texts(8), retain_texts(retain, 8), **kw)
    api.fit(SelectivePruningConfig(ratio=0.05), forget.probe_texts(8), retain_texts(retain, 8), **kw)
    # Key Space Detection: the bare questions, calibrated on the retain skills' questions by skill
    api.fit(
        KeySpaceDetectionConfig(), forget.probe_questions(8), {"mbpp": retain[0].probe_questions(8)}, **kw
    )
    assert list(cli.methods) == list(api.methods)
    for name, method in api.methods.items():
        assert cli.methods[name].config == method.config
        for key, value in method.state_dict().items():
            assert torch.equal(cli.methods[name].state_dict()[key], value), (name, key)

    # sequential: Selective Pruning was probed with Neuron Adjust active, not on the bare model
    bare = UnlearnedModelForCausalLM.from_base(AutoModelForCausalLM.from_pretrained(tiny_dir))
    alone = bare.fit(SelectivePruningConfig(ratio=0.05), forget.probe_texts(8), retain_texts(retain, 8), **kw)
    assert not torch.equal(alone.state["score"], api.methods["selective_pruning"].state["score"])


def test_interactive_generate(tiny_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unlearn_hf.cli.main",
            "generate",
            "--model",
            str(tiny_dir),
            "--max-new-tokens",
            "3",
            "-q",
        ],
        input="hello\nsecond question\n\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) >= 1


@pytest.mark.slow
def test_short_demo_on_smollm2(shared_data, tmp_path, smollm2, capsys):
    out_dir = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--data-dir",
            str(shared_data),
            "--n-probe",
            "24",
            "--n-eval",
            "6",
            "--n-eval-mmlu",
            "3",
            "--methods",  # Selective Pruning's fit and evaluation run in tests/test_integration_na_sp.py
            "na,ksd",
            "--ratio-grid",  # measured: held-out retain drop 0.6% at 0.03, 4.8% at 0.1 (chosen), 8.9% at 0.2
            "0.03,0.1,0.2",
            "--output",
            str(out_dir),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out  # --quiet still prints the results
    report = json.loads((out_dir / "results.json").read_text())
    assert report["models"] == ["base", "Neuron Adjust", "Key Space Detection"]
    # the demo's default --ratio auto: Neuron Adjust's ratio was chosen on held-out examples, within the budget
    chosen = report["metadata"]["ratio_chosen"]["Neuron Adjust"]
    assert report["metadata"]["ratio"] == "auto" and chosen["ratios"] == [0.03, 0.1, 0.2]
    assert chosen["ratio"] in chosen["ratios"]
    assert chosen["held_out_retain_drop"] <= chosen["max_retain_drop"] == 0.05
    assert (out_dir / "results.md").read_text().strip() in printed
    assert report["skills"] == ["gsm8k", "mbpp", "mmlu"]
    for label, drops in report["relative_drop"].items():
        for skill, drop in drops.items():
            before, after = report["scores"]["base"][skill], report["scores"][label][skill]
            if before:
                assert drop == pytest.approx((before - after) / before)
    table = (out_dir / "results.md").read_text()
    assert "Key Space Detection" in table and "gsm8k" in table
    assert (out_dir / "results.png").stat().st_size > 1000
    model_dir = out_dir / "smollm2-no-gsm8k-ksd"
    card = (model_dir / "README.md").read_text()
    assert "library_name: unlearn_hf" in card and "gsm8k" in card
    from unlearn_hf.cli.push import read_card_info  # what `unlearn-hf push` of this folder puts on its card

    info = read_card_info(model_dir)
    assert info["forget_skill"] == "gsm8k" and info["retain_skills"] == ["mbpp", "mmlu"]
    assert {row["method"] for row in info["evaluation"]} == {"Neuron Adjust", "Key Space Detection"}
    # each row says what was scored, on which split and how many items (it said "score" on "held-out data")
    expected = {
        "gsm8k (test split, 6 held-out items)": "teacher-forced answer-token accuracy",
        "mbpp (test split, 6 held-out items)": "teacher-forced answer-token accuracy",
        "mmlu (test split, even rows, 3 held-out items)": "5-shot multiple-choice accuracy",
    }
    assert {row["skill"] for row in info["evaluation"]} <= set(expected)
    assert all(row["metric"].startswith(expected[row["skill"]]) for row in info["evaluation"])
    assert "gsm8k (test split, 6 held-out items)" in card
    loaded = UnlearnedModelForCausalLM.from_pretrained(str(model_dir))
    assert list(loaded.methods) == ["key_space_detection"]
    # the saved hypercube gives the same decisions as reported: GSM8K prompts abstain at the reported rate
    from unlearn_hf.evaluation import abstention_rate, get_skill
    from unlearn_hf.evaluation.prompts import render_item

    items = get_skill("gsm8k", shared_data).eval_items(6)
    for fmt in ("qa", "chat"):  # both formats are reported, each from its own prompts
        rate = report["metadata"]["abstention_rate"]["Key Space Detection"][fmt]["gsm8k"]
        prompts = [render_item(i, smollm2[1], fmt).prompt for i in items]
        assert abstention_rate(loaded, smollm2[1], prompts) == pytest.approx(rate)
