"""The command line never lies: every user error exits 2 with one line (no traceback), and ``--model`` loads the
unlearning whenever the folder or Hub repo holds it (light or full layout), a plain model only when it does not,
saying so."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_persistence import fit_methods
from hub_server import hub_env, start_hub_server
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM

from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM
from unlearn_hf.cli.common import UserError, load_model
from unlearn_hf.cli.main import main
from unlearn_hf.persistence import CONFIG_NAME, WEIGHTS_NAME

TOKEN = "hf_unlearn_cli_token"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smol_tokenizer, shared_data):
    """A tiny plain model, a light unlearned checkpoint of it, broken copies, bad data folders, a file, a FIFO."""
    root = tmp_path_factory.mktemp("cli-errors")
    tiny = root / "tiny"
    tiny_llama(layers=4).save_pretrained(tiny)
    smol_tokenizer.save_pretrained(tiny)
    unlearned = fit_methods(
        UnlearnedModelForCausalLM.from_base(AutoModelForCausalLM.from_pretrained(tiny)),
        smol_tokenizer,
        ("na",),
    )
    good = root / "unlearned"
    unlearned.save_pretrained(good)
    bad_config = root / "bad-config"
    unlearned.save_pretrained(bad_config)
    (bad_config / CONFIG_NAME).write_text("{not json")
    truncated = root / "truncated"
    unlearned.save_pretrained(truncated)
    data = (truncated / WEIGHTS_NAME).read_bytes()
    (truncated / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])

    def data_dir(name: str, content: bytes | None) -> Path:
        folder = root / name / "gsm8k"
        folder.mkdir(parents=True)
        (folder / "test.jsonl").write_bytes(
            (shared_data / "gsm8k" / "test.jsonl").read_bytes()[:2000].rsplit(b"\n", 1)[0]
        )
        if content is None:
            os.mkfifo(folder / "train.jsonl")
        else:
            (folder / "train.jsonl").write_bytes(content)
        return folder.parent

    dirs = {
        "latin1": data_dir("latin1", '{"question": "caf\u00e9", "answer": "1"}\n'.encode("latin-1")),
        "badjson": data_dir("badjson", b'{"question": "a", "answer": "1"}\n{"question": \n'),
        "nocolumn": data_dir("nocolumn", b'{"question": "a", "solution": "1"}\n'),
        "array": data_dir("array", b'["question", "answer"]\n'),
        "nested": data_dir("nested", b"[" * 200_000 + b"]" * 200_000 + b"\n"),
        "types": data_dir("types", b'{"question": 1, "answer": 2}\n'),
        "empty": data_dir("empty", b""),
        "fifo": data_dir("fifo", None),
    }
    for name, row in (
        ("mbpp_types", {"task_id": 601, "text": "t", "code": "c", "test_list": 5}),
        ("mbpp_taskid", {"task_id": "abc", "text": "t", "code": "c", "test_list": []}),
    ):
        (root / name / "mbpp").mkdir(parents=True)
        (root / name / "mbpp" / "mbpp.jsonl").write_text(json.dumps(row) + "\n")
        dirs[name] = root / name
    nochat = root / "nochat"  # a tokenizer without a chat template
    tiny_llama(layers=4).save_pretrained(nochat)
    plain_tok = copy.deepcopy(smol_tokenizer)
    plain_tok.chat_template = None
    plain_tok.save_pretrained(nochat)
    dirs["nochat"] = nochat
    good_gz = (shared_data / "humaneval" / "HumanEval.jsonl.gz").read_bytes()
    (root / "badgz" / "humaneval").mkdir(parents=True)
    (root / "badgz" / "humaneval" / "HumanEval.jsonl.gz").write_bytes(
        good_gz[:200] + bytes(b ^ 0x5A for b in good_gz[200:400]) + good_gz[400:]
    )
    dirs["badgz"] = root / "badgz"
    a_file = root / "a-file.txt"
    a_file.write_text("x")
    return {
        "tiny": tiny,
        "good": good,
        "bad_config": bad_config,
        "truncated": truncated,
        "file": a_file,
        **dirs,
    }


FIT = [
    "fit",
    "--model",
    "{tiny}",
    "--method",
    "na",
    "--forget",
    "gsm8k",
    "--data-dir",
    "{data}",
    "--output",
    "{out}",
]
EVAL = ["evaluate", "--model", "{tiny}", "--skills", "gsm8k", "--data-dir", "{data}", "--n-eval", "2"]

#: (arguments, what the one line must say). ``{out}`` is a fresh folder path.
BAD_INPUTS = [
    ([*FIT, "--ratio", "2"], "--ratio: must be in (0, 1]"),
    ([*FIT, "--ratio", "0"], "--ratio: must be in (0, 1]"),
    ([*FIT, "--ratio", "most"], "--ratio: expected a number, got 'most'"),
    ([*FIT, "--max-retain-drop", "1"], "--max-retain-drop: must be in (0, 1), got '1'"),
    ([*FIT, "--max-retain-drop", "0"], "--max-retain-drop: must be in (0, 1), got '0'"),
    ([*FIT, "--ratio", "0.03", "--max-retain-drop", "0.1"], "--max-retain-drop applies to --ratio auto only"),
    (
        ["demo", "--ratio", "0.03", "--max-retain-drop", "0.1", "--output", "{out}"],
        "applies to --ratio auto only",
    ),
    (
        [*FIT, "--ratio-grid", "0.1,0.1"],
        "--ratio-grid: expected distinct comma-separated ratios, got '0.1,0.1'",
    ),
    ([*FIT, "--ratio-grid", ","], "--ratio-grid: expected distinct comma-separated ratios, got ','"),
    ([*FIT, "--ratio-grid", "0,0.1"], "--ratio-grid: must be in (0, 1], got '0'"),
    ([*FIT, "--ratio-grid", "0.1,x"], "--ratio-grid: expected a number, got 'x'"),
    ([*FIT, "--ratio", "0.03", "--ratio-grid", "0.1"], "--ratio-grid applies to --ratio auto only"),
    (
        ["demo", "--ratio", "0.03", "--ratio-grid", "0.1", "--output", "{out}"],
        "--ratio-grid applies to --ratio auto",
    ),
    ([*FIT[:4], "ksd", *FIT[5:], "--ratio-grid", "0.1"], "--ratio-grid does not apply to --method ksd"),
    ([*FIT, "--alpha", "-1"], "--alpha: must be in (0, inf]"),
    ([*FIT, "--alpha", "nan"], "--alpha: must be finite"),
    ([*FIT, "--batch-size", "0"], "--batch-size: must be in [1, inf]"),
    ([*FIT, "--max-batch-tokens", "0"], "--max-batch-tokens: must be in [1, inf]"),
    ([*FIT, "--n-probe", "0"], "--n-probe: must be in [1, inf]"),
    ([*FIT, "--n-probe", "many"], "--n-probe: expected an integer"),
    ([*FIT, "--seed", "-1"], "--seed: must be in [0,"),
    ([*FIT, "--max-false-rate", "1.5"], "--max-false-rate: must be in [0, 1]"),
    ([*FIT, "--method", "lobotomy"], "invalid choice: 'lobotomy'"),
    ([*FIT, "--method", "ksd", "--layers", "99"], "--layers [99] out of range: the model has layers 0..3"),
    ([*FIT, "--method", "ksd", "--layers", "1,x"], "--layers must be 'auto' or comma-separated integers"),
    ([*FIT, "--method", "ksd", "--layers", ","], "--layers is empty"),
    ([*FIT[:-1], "{file}"], "exists and is not a folder"),
    ([*FIT[:-1], "{file}/sub"], "is not a folder"),
    ([*FIT, "--forget", "cooking"], "Unknown skill 'cooking'"),
    ([*FIT[:-4], "--data-dir", "/nonexistent/data", "--output", "{out}"], "does not exist"),
    ([*FIT[:-4], "--data-dir", "{latin1}", "--output", "{out}"], "is not UTF-8 text"),
    ([*FIT[:-4], "--data-dir", "{badjson}", "--output", "{out}"], "line 2 is not valid JSON"),
    ([*FIT[:-4], "--data-dir", "{array}", "--output", "{out}"], "line 1 is a JSON list, not an object"),
    ([*FIT[:-4], "--data-dir", "{nocolumn}", "--output", "{out}"], "has no column(s) ['answer']"),
    ([*FIT[:-4], "--data-dir", "{fifo}", "--output", "{out}"], "is not a regular file"),
    ([*FIT[:-4], "--data-dir", "{nested}", "--output", "{out}"], "line 1 is nested too deeply"),
    ([*FIT[:-4], "--data-dir", "{types}", "--output", "{out}"], "column 'question' must be text, got int"),
    (
        ["evaluate", "--model", "{tiny}", "--skills", "humaneval", "--data-dir", "{badgz}"],
        "is a corrupt gzip file",
    ),
    ([*FIT[:-4], "--data-dir", "{empty}", "--output", "{out}"], "no items"),
    (["fit", "--model", "{good}", *FIT[3:]], "is already an unlearned model"),
    ([*EVAL, "--formats", "pirate"], "Unknown prompt formats ['pirate']"),
    ([*EVAL, "--formats", ""], "--formats '' names no format"),  # was a traceback after the model loaded
    ([*EVAL, "--formats", " , "], "--formats ' , ' names no format"),
    (
        [*EVAL, "--limit", "3"],
        "--limit: lm-eval options; add --harness lm-eval",
    ),  # the native harness ignored it
    ([*EVAL, "--num-fewshot", "0", "--tasks", "x"], "--tasks, --num-fewshot: lm-eval options"),
    ([*EVAL, "--skills", ","], "No skill names given"),
    ([*EVAL, "--skills", ""], "No skill names given"),  # not the default skills (a review)
    ([*EVAL, "--n-eval", "-3"], "--n-eval: must be in [1, inf]"),
    ([*EVAL, "--output", "{tiny}"], "is a folder; give a file name"),
    (
        ["evaluate", "--model", "/nonexistent/model", "--skills", "gsm8k", "--data-dir", "{data}"],
        "Cannot load model '/nonexistent/model': no such folder",
    ),
    (
        ["evaluate", "--model", "{bad_config}", "--skills", "gsm8k", "--data-dir", "{data}"],
        "Cannot load model",
    ),
    (
        ["evaluate", "--model", "{truncated}", "--skills", "gsm8k", "--data-dir", "{data}"],
        "Cannot load model",
    ),
    (
        ["generate", "--model", "{tiny}", "--prompt", "hi", "--template", "no placeholder"],
        "must hold '{prompt}'",
    ),
    (
        ["generate", "--model", "{tiny}", "--prompt", "hi", "--max-new-tokens", "0"],
        "--max-new-tokens: must be",
    ),
    (["generate", "--model", "{bad_config}", "--prompt", "hi"], "Cannot load model"),
    (["push", "--model", "{tiny}", "--repo-id", "a/b"], "not a folder saved by unlearn_hf"),
    (["demo", "--data-dir", "/nonexistent/data", "--output", "{out}"], "not found"),
    (["demo", "--output", "{file}"], "exists and is not a folder"),
    (["dance"], "invalid choice: 'dance'"),
    # found by a review of the command line
    (
        [*[*FIT[:4], "ksd", *FIT[5:]], "--ratio", "0.03"],
        "--ratio does not apply to --method ksd; it is an option of na, sp",
    ),
    ([*FIT, "--layers", "1"], "--layers does not apply to --method na; it is an option of ksd"),
    (
        [*FIT[:4], "ksd", *FIT[5:], "--deterministic"],
        "--deterministic does not apply to --method ksd; it is an option of na",
    ),
    ([*FIT, "--refusal", "No."], "--refusal does not apply to --method na"),
    ([*FIT, "--method", "na"], "--method na is given twice"),
    ([*FIT[:-1], ""], "--output is empty"),
    ([*FIT[:-1], "{tiny}"], "is the base model's own folder"),
    ([*FIT, "--retain", ""], "Neuron Adjust need at least one retain skill"),
    (
        [*EVAL, "--skills", "mbpp", "--data-dir", "{mbpp_types}"],
        "mbpp.jsonl: row 0 (task 601), test_list must be a list of text, got 5",
    ),
    (
        [*EVAL, "--skills", "mbpp", "--data-dir", "{mbpp_taskid}"],
        "mbpp.jsonl: row 0, task_id 'abc' is not an integer",
    ),
    ([*EVAL, "--output", "{file}/results.json"], "is a file, not a folder"),
    ([*EVAL[:2], "{nochat}", *EVAL[3:], "--formats", "qa,chat"], "--formats chat needs a chat template"),
    (["generate", "--model", "{tiny}", "--prompt", "", "--template", "{{prompt}}"], "The prompt is empty"),
    (["demo", "--model", "/nonexistent/m", "--data-dir", "{data}", "--output", "{out}"], "Cannot load model"),
    # found by a review of the data paths: the same texts to forget and to keep, or one retain skill twice
    ([*FIT, "--retain", "mbpp,GSM8K"], "'gsm8k' is both the skill to forget and a skill to keep"),
    ([*FIT, "--retain", "mbpp,MBPP"], "--retain names mbpp more than once"),
    (
        ["demo", "--retain", "gsm8k", "--data-dir", "{data}", "--output", "{out}"],
        "is both the skill to forget",
    ),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[f"{i:02d}" for i in range(len(BAD_INPUTS))])
def test_user_error_exits_2_in_one_line(args, message, folders, shared_data, tmp_path, capsys):
    values = {k: str(v) for k, v in folders.items()} | {
        "data": str(shared_data),
        "out": str(tmp_path / "out"),
    }
    argv = [a.format(**values) for a in args]
    try:
        code = main([*argv, "-q"] if argv[0] != "dance" else argv)
    except SystemExit as exited:  # argparse's own errors
        code = exited.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_user_error_in_a_real_process_is_one_line_on_stderr(folders, shared_data, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unlearn_hf.cli.main",
            "evaluate",
            "--model",
            str(folders["truncated"]),
            "--skills",
            "gsm8k",
            "--data-dir",
            str(shared_data),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("unlearn-hf evaluate: error: Cannot load model"), (
        proc.stderr
    )


@pytest.mark.parametrize("command", ["fit", "evaluate", "demo"])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(
    command, folders, shared_data, tmp_path, capsys, monkeypatch
):
    """An --output on a read-only file system (or without permission) is refused in one line before the model is
    loaded: it failed with a traceback from mkdir, or after the whole fit or evaluation (a review)."""
    import unlearn_hf.cli.arguments as arguments
    import unlearn_hf.cli.main as cli

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        arguments.os,
        "access",
        # its folders cannot be written to, an existing file in it can
        lambda p, mode: real_access(p, mode) and not (Path(p).is_dir() and Path(p).is_relative_to(read_only)),
    )

    def no_work(*args, **kwargs):
        raise AssertionError("the work started")

    monkeypatch.setattr(cli, "load_model", no_work)
    monkeypatch.setattr("unlearn_hf.cli.demo.run_demo", no_work)
    out = str(read_only / "sub" / ("results.json" if command == "evaluate" else "model"))
    argv = {
        "fit": [
            "fit",
            "--model",
            str(folders["tiny"]),
            "--method",
            "na",
            "--forget",
            "gsm8k",
            "--retain",
            "mbpp",
        ],
        "evaluate": ["evaluate", "--model", str(folders["tiny"]), "--skills", "gsm8k"],
        "demo": ["demo"],
    }[command]
    code = main([*argv, "--data-dir", str(shared_data), "--output", out, "-q"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and f"cannot write into {read_only}" in lines[0], err
    assert not (read_only / "sub").exists()
    if command == "evaluate":  # an existing file that can be written is rewritten in place: the work starts
        (read_only / "results.json").write_text("{}")
        with pytest.raises(AssertionError, match="the work started"):
            main([*argv, "--data-dir", str(shared_data), "--output", str(read_only / "results.json"), "-q"])


def test_unexpected_failures_exit_1_with_a_traceback(folders, monkeypatch):
    """A bug is not a user error: it keeps its traceback (and Python's exit code 1)."""
    import unlearn_hf.cli.main as cli

    monkeypatch.setitem(cli.COMMANDS, "generate", lambda args: [][1])
    with pytest.raises(IndexError):
        main(["generate", "--model", str(folders["tiny"]), "--prompt", "hi"])


@pytest.mark.parametrize("full", [False, True], ids=["light", "full"])
def test_model_from_the_hub_loads_its_unlearning(full, folders, smol_tokenizer, tmp_path, caplog):
    """An unlearned repo on a (loopback) Hub loads as the unlearned model in both layouts, a plain repo as the
    plain model with a warning; offline, the cached snapshots decide the same."""
    from huggingface_hub import HfApi

    base = AutoModelForCausalLM.from_pretrained(folders["tiny"]).eval()
    unlearned = UnlearnedModelForCausalLM.from_base(base)
    question = "What is 2 + 3? Answer: 5"
    unlearned.fit(
        KeySpaceDetectionConfig(alpha=1.0, layers=[1]),
        [question, "Compute 7 * 8 = 56"],
        tokenizer=smol_tokenizer,
        show_progress=False,
    )
    with start_hub_server(tmp_path) as hub, hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        api = HfApi()
        repo = f"user/unlearned-{'full' if full else 'light'}"
        unlearned.push_to_hub(
            repo,
            save_base_model=full,
            tokenizer=smol_tokenizer,
            base_model_name_or_path=None if full else "user/plain",
        )
        api.create_repo("user/plain")
        api.upload_folder(repo_id="user/plain", folder_path=folders["tiny"])
        for offline in (False, True):
            with hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN, offline=offline):
                model, tok = load_model(repo)
                assert isinstance(model, UnlearnedModelForCausalLM), offline
                ids = tok(question, return_tensors="pt")
                assert model.detect(ids["input_ids"]).tolist() == [True]
                with caplog.at_level(logging.WARNING):
                    plain, _ = load_model("user/plain")
                assert not isinstance(plain, UnlearnedModelForCausalLM)
                assert "loaded as a plain transformers model, without unlearning" in caplog.text
                caplog.clear()
                with torch.no_grad():
                    assert torch.equal(plain(**ids).logits, base(**ids).logits)
        if (
            full
        ):  # a cache holding the repo's model files, as a plain from_pretrained leaves it, but not its config
            fresh = tmp_path / "fresh-cache"
            with hub_env(hub.endpoint, fresh, token=TOKEN):
                AutoModelForCausalLM.from_pretrained(repo)
            with hub_env(hub.endpoint, fresh, token=TOKEN, offline=True):
                with pytest.raises(
                    UserError, match="Cannot tell whether user/unlearned-full holds unlearning"
                ):
                    load_model(repo)


def test_a_repo_that_gained_unlearning_since_it_was_cached_loads_unlearned(folders, smol_tokenizer, tmp_path):
    """The cache records that a plain repo had no unlearn_config.json; once an unlearned model is pushed to that
    repo, the CLI (online) must ask the Hub about its current revision, not trust the old record (a review: it
    loaded the plain model, with the warning that there was no unlearning); offline, the cache still decides."""
    from huggingface_hub import HfApi

    base = AutoModelForCausalLM.from_pretrained(folders["tiny"]).eval()
    with start_hub_server(tmp_path) as hub, hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        HfApi().create_repo("user/model")
        HfApi().upload_folder(repo_id="user/model", folder_path=folders["tiny"])
        plain, _ = load_model("user/model")  # caches the record that the repo holds no unlearning
        assert not isinstance(plain, UnlearnedModelForCausalLM)
        unlearned = UnlearnedModelForCausalLM.from_base(base)
        fit_methods(unlearned, smol_tokenizer, ("ksd",))
        unlearned.push_to_hub("user/model", save_base_model=True, tokenizer=smol_tokenizer)
        model, _ = load_model("user/model")
        assert isinstance(model, UnlearnedModelForCausalLM) and sorted(model.methods) == ["ksd"]
        with hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN, offline=True):
            model, _ = load_model("user/model")  # the last answer online is in the cache now
            assert isinstance(model, UnlearnedModelForCausalLM)


# a full checkpoint saved without tokenizer= (as FORMAT.md shows) found no tokenizer: its _name_or_path is its own
# folder; the tokenizer is now also looked for at the base model it records (a review)
@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_cli_generate_on_an_unlearned_folder_abstains(
    folders, smol_tokenizer, tmp_path, capsys, with_tokenizer
):
    unlearned = UnlearnedModelForCausalLM.from_base(AutoModelForCausalLM.from_pretrained(folders["tiny"]))
    question = "What is 2 + 3?"
    template = "Question: {prompt}\nAnswer:"
    # the fitted keys lie on the α = 1 boundary: a margin, so a CPU whose kernels round differently still abstains
    unlearned.fit(
        KeySpaceDetectionConfig(inputs="prompts", alpha=1.5, layers=[1], refusal="No."),
        [template.replace("{prompt}", q) for q in (question, "Compute 7 * 8.")],
        tokenizer=smol_tokenizer,
        show_progress=False,
    )
    unlearned.save_pretrained(
        tmp_path / "m", save_base_model=True, tokenizer=smol_tokenizer if with_tokenizer else None
    )
    assert (tmp_path / "m" / "tokenizer.json").is_file() == with_tokenizer
    assert (
        main(
            ["generate", "--model", str(tmp_path / "m"), "--prompt", question, "--max-new-tokens", "5", "-q"]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == "No."
    assert json.loads((tmp_path / "m" / CONFIG_NAME).read_text())["layout"] == "full"


def test_push_uploads_the_folder_as_it_was_saved(folders, smol_tokenizer, tmp_path, capsys):
    """``push`` of a full folder uploads the base model's files and the tokenizer, so the repo loads anywhere as
    the same unlearned model; a light folder whose base model is a local folder is refused (it would load nowhere
    else) unless ``--save-base-model``; no Hub to reach is one line, exit 2 (found by a review)."""
    from huggingface_hub import HfApi

    unlearned = UnlearnedModelForCausalLM.from_base(AutoModelForCausalLM.from_pretrained(folders["tiny"]))
    fit_methods(unlearned, smol_tokenizer, ("na", "ksd"))
    full, light = tmp_path / "full", tmp_path / "light"
    unlearned.save_pretrained(full, save_base_model=True, tokenizer=smol_tokenizer)
    unlearned.save_pretrained(light, tokenizer=smol_tokenizer)
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        expected = unlearned(input_ids=ids).logits
    with start_hub_server(tmp_path) as hub, hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        assert main(["push", "--model", str(full), "--repo-id", "user/full", "-q"]) == 0
        files = set(HfApi().list_repo_files("user/full"))
        assert {CONFIG_NAME, "config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
        capsys.readouterr()
        assert main(["push", "--model", str(light), "--repo-id", "user/light", "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert "--save-base-model" in err and len(err.splitlines()) == 1, err
        assert (
            main(["push", "--model", str(light), "--repo-id", "user/light", "--save-base-model", "-q"]) == 0
        )
        assert "model.safetensors" in HfApi().list_repo_files("user/light")
        capsys.readouterr()
        head = hub.head("user/full")  # public: --private would publish (a review found this a traceback)
        assert main(["push", "--model", str(full), "--repo-id", "user/full", "--private", "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert "exists and is public" in err and len(err.splitlines()) == 1, err
        assert hub.head("user/full") == head
        with hub_env("http://127.0.0.1:9", tmp_path / "cache2", token=TOKEN):  # no Hub listening there
            assert main(["push", "--model", str(full), "--repo-id", "user/x", "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert "Cannot push to 'user/x'" in err and len(err.splitlines()) == 1, err
        with hub_env(hub.endpoint, tmp_path / "elsewhere", token=TOKEN):  # a fresh cache: another machine
            for repo in ("user/full", "user/light"):
                model, _ = load_model(repo)
                assert isinstance(model, UnlearnedModelForCausalLM) and sorted(model.methods) == ["ksd", "na"]
                with torch.no_grad():
                    assert torch.equal(model(input_ids=ids).logits, expected), repo


def test_push_puts_the_skills_that_fit_recorded_on_the_card(
    folders, shared_data, smol_tokenizer, tmp_path, caplog
):
    """``fit`` records the skills beside the checkpoint (unlearn_card.json) and ``push`` puts them on the card (a
    review: the card said the forgotten skill was "unspecified"); once the checkpoint is replaced by another save,
    the record is for another model: ignored, with a warning; ``--forget-skill`` / ``--retain-skills`` name them."""
    from huggingface_hub import ModelCard

    out = tmp_path / "fitted"
    argv = ["fit", "--model", str(folders["tiny"]), "--method", "sp", "--ratio", "0.05", "--forget", "gsm8k"]
    argv += ["--retain", "mbpp", "--n-probe", "8", "--data-dir", str(shared_data), "--output", str(out), "-q"]
    assert main(argv) == 0
    with start_hub_server(tmp_path) as hub, hub_env(hub.endpoint, tmp_path / "cache", token=TOKEN):
        push = ["push", "--model", str(out), "--save-base-model", "-q", "--repo-id"]
        assert main([*push, "user/fitted"]) == 0
        card = ModelCard(hub.files("user/fitted")["README.md"].decode())
        assert "**gsm8k** skill" in card.text and "mbpp" in card.text and "unspecified" not in card.text
        model = UnlearnedModelForCausalLM.from_pretrained(out)
        model.save_pretrained(out)  # another save (the same model, but the record cannot know it)
        with caplog.at_level(logging.WARNING):
            assert main([*push, "user/resaved"]) == 0
        assert "describes an earlier save" in caplog.text
        assert "unspecified" in ModelCard(hub.files("user/resaved")["README.md"].decode()).text
        assert (
            main([*push, "user/named", "--forget-skill", "arithmetic", "--retain-skills", "code,prose"]) == 0
        )
        text = ModelCard(hub.files("user/named")["README.md"].decode()).text
        assert "**arithmetic** skill" in text and "code" in text and "prose" in text


def test_evaluate_scores_qa_only_without_a_chat_template(folders, shared_data, tmp_path, caplog):
    out = tmp_path / "r.json"
    argv = ["evaluate", "--model", str(folders["nochat"]), "--skills", "gsm8k", "--n-eval", "2"]
    with caplog.at_level(logging.WARNING):
        code = main([*argv, "--data-dir", str(shared_data), "--output", str(out), "-q"])
    assert code == 0 and "no chat template: scoring the qa format only" in caplog.text
    assert json.loads(out.read_text())["metadata"]["formats"] == ["qa"]


def test_ksd_fits_without_retain_skills(folders, shared_data, tmp_path):
    """``--retain ''`` with Key Space Detection alone: fitted uncalibrated (the middle layer, alpha 1)."""
    out = tmp_path / "m"
    argv = ["fit", "--model", str(folders["tiny"]), "--method", "ksd", "--forget", "gsm8k", "--retain", ""]
    assert main([*argv, "--data-dir", str(shared_data), "--n-probe", "8", "--output", str(out), "-q"]) == 0
    saved = json.loads((out / CONFIG_NAME).read_text())
    (config,) = [m["config"] for m in saved["methods"]]
    assert config["layers"] == [2] and config["alpha"] == 1.0 and config["calibration"] is None


def test_cli_generate_gives_a_template_that_starts_with_bos_one_bos(
    bos_tokenizer, tmp_path, monkeypatch, capsys
):
    """`generate --template` tokenized the template with the tokenizer's special tokens: a template that starts with
    the BOS token (a chat template written out) got two with a tokenizer that adds its own; now one."""
    from transformers import GenerationMixin

    folder = tmp_path / "bos"
    tiny_llama(layers=2).save_pretrained(folder)
    bos_tokenizer.save_pretrained(folder)
    seen = []
    real = GenerationMixin.generate

    def recording(self, *args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    bos = bos_tokenizer.bos_token
    args = ["generate", "--model", str(folder), "--max-new-tokens", "2", "-q", "--prompt", "hi"]
    assert main([*args, "--template", bos + "user\n{prompt}"]) == 0
    assert main([*args, "--template", "Q: {prompt}"]) == 0
    capsys.readouterr()
    one = bos_tokenizer.bos_token_id
    assert seen[0][:2] == [one, bos_tokenizer.encode("user", add_special_tokens=False)[0]]
    assert seen[1][0] == one and seen[1][1] != one  # a template without BOS still gets the tokenizer's
