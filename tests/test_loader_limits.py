"""Loader edges: every value read from a checkpoint is checked (schema, ranges, sizes, nesting) before it is used,
and a full checkpoint never unpickles its base weights."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers_persistence import fit_methods
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM

from unlearn_hf import UnlearnedModelForCausalLM
from unlearn_hf.persistence import CONFIG_NAME, WEIGHTS_NAME, UnlearnFormatError
from unlearn_hf.persistence.config_file import MAX_CONFIG_BYTES


@pytest.fixture(scope="module")
def saved(tmp_path_factory, smol_tokenizer) -> dict[str, Path]:
    """A light and a full checkpoint of a tiny model with NA + KSD."""
    root = tmp_path_factory.mktemp("limits")
    tiny_llama(seed=0).save_pretrained(root / "base")
    model = fit_methods(
        UnlearnedModelForCausalLM.from_base(AutoModelForCausalLM.from_pretrained(root / "base")),
        smol_tokenizer,
        ("na", "ksd"),
    )
    model.save_pretrained(root / "light")
    model.save_pretrained(root / "full", save_base_model=True)
    return {"light": root / "light", "full": root / "full"}


def edited(src: Path, dst: Path, edit) -> Path:
    """A copy of the checkpoint ``src`` whose config ``edit(config)`` changed (in place)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / CONFIG_NAME).read_text())
    edit(config)
    (dst / CONFIG_NAME).write_text(json.dumps(config))
    return dst


def no_base_load(monkeypatch) -> None:
    """Fail the test if a base model would be loaded (the checks must come first)."""
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the base model was loaded")
    )


def set_fingerprint(value):
    def edit(config):
        config["base_model"]["fingerprint"] = value

    return edit


@pytest.mark.parametrize(
    "fingerprint, message",
    [
        ({"weights": [1, 2]}, r"fingerprint'\.weights\[0\] must be an object"),
        ({"weights": "all of them"}, r"fingerprint'\.weights must be a list"),
        ({"ffl_sites": [{"pre": 3}]}, r"fingerprint'\.ffl_sites\[0\]\.pre must be a string"),
        ({"ffl_sites": [{"d_ff": -1}]}, r"ffl_sites\[0\]\.d_ff must be a non-negative integer"),
        ({"weights": [{"shape": "4x4"}]}, r"weights\[0\]\.shape must be a list of non-negative integers"),
        ({"weights": [{"sha256": "xyz"}]}, r"weights\[0\]\.sha256 must be 64 lowercase hex digits"),
        ({"weights": [{"sample": [1, "a"]}]}, r"weights\[0\]\.sample must be a list of finite numbers"),
        ({"num_layers": "30"}, r"fingerprint'\.num_layers must be a non-negative integer"),
        ({"parameters": {"a": 1}}, r"fingerprint'\.parameters must be a list"),
        (
            {"parameters": [["w", "float32", [2], "xyz", [1.0]]]},
            r"parameters\[0\] must be \[name, dtype, shape",
        ),
        (
            {"parameters": [["w", "float32", [2], None, [1.0]]]},
            r"parameters\[0\] must be \[name, dtype, shape",
        ),
        ({"parameters": [["w", "float32", "2x2", "0" * 16, None]]}, r"parameters\[0\] must be"),
        ({"parameters": [["w", "float32", [2], "0" * 16]]}, r"parameters\[0\] must be"),
        ({"parameters": [["w", "float32", [2], "0" * 16, [10**400]]]}, r"parameters\[0\] must be"),
        ({"weights": [{"sample": [10**400]}]}, r"weights\[0\]\.sample must be a list of finite numbers"),
    ],
)
def test_junk_in_the_fingerprint_is_refused_before_the_base_model_loads(
    fingerprint, message, saved, tmp_path, monkeypatch
):
    folder = edited(saved["light"], tmp_path / "c", set_fingerprint(fingerprint))
    no_base_load(monkeypatch)
    with pytest.raises(UnlearnFormatError, match=message):
        UnlearnedModelForCausalLM.from_pretrained(folder)


def test_an_empty_fingerprint_loads_with_a_loud_warning(saved, tmp_path, caplog):
    folder = edited(saved["light"], tmp_path / "c", set_fingerprint({}))
    with caplog.at_level(logging.WARNING):
        model = UnlearnedModelForCausalLM.from_pretrained(folder)
    assert list(model.methods) == ["na", "ksd"]
    assert "fingerprint is empty" in caplog.text and "nothing can tell" in caplog.text


def test_deeply_nested_json_is_refused_without_recursion(saved, tmp_path, monkeypatch):
    def edit(config):
        config["forget_data"] = "x"

    folder = edited(saved["light"], tmp_path / "c", edit)
    text = (
        (folder / CONFIG_NAME)
        .read_text()
        .replace('"forget_data": "x"', '"forget_data": ' + "[" * 100_000 + "]" * 100_000)
    )
    (folder / CONFIG_NAME).write_text(text)
    no_base_load(monkeypatch)
    with pytest.raises(UnlearnFormatError, match="nested 100001 levels deep"):
        UnlearnedModelForCausalLM.from_pretrained(folder)


def test_oversized_files_are_refused_before_reading(saved, tmp_path, monkeypatch):
    """Sparse files far larger than memory: refused from their size and header alone."""
    no_base_load(monkeypatch)
    big_config = Path(shutil.copytree(saved["light"], tmp_path / "config"))
    with open(big_config / CONFIG_NAME, "r+b") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(UnlearnFormatError, match="over the .*-byte limit of a config"):
        UnlearnedModelForCausalLM.from_pretrained(big_config)

    big_weights = Path(shutil.copytree(saved["light"], tmp_path / "weights"))
    with open(big_weights / WEIGHTS_NAME, "r+b") as f:
        f.truncate(8 * 2**30)  # 8 GiB, sparse: the valid header and tensors, then zeros
    with pytest.raises(UnlearnFormatError, match="do not use them all"):
        UnlearnedModelForCausalLM.from_pretrained(big_weights)

    def huge(config):
        config["methods"][0]["tensors"]["forget_mean"]["shape"] = [2**40]

    with pytest.raises(UnlearnFormatError, match="declares .* bytes of fitted tensors, over the"):
        UnlearnedModelForCausalLM.from_pretrained(edited(saved["light"], tmp_path / "declared", huge))


def ksd_config(key, value):
    def edit(config):
        (m,) = [m for m in config["methods"] if m["method_type"] == "key_space_detection"]
        m["config"][key] = value

    return edit


def ksd_layers(src: Path, dst: Path, layers: list[int]) -> Path:
    """A consistent checkpoint (config, state tensor and its sha256) whose KSD names ``layers``."""
    folder = edited(src, dst, ksd_config("layers", layers))
    with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(folder / WEIGHTS_NAME))
    tensors["ksd.layers"] = torch.tensor(layers, dtype=tensors["ksd.layers"].dtype)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata=metadata)
    config = json.loads((folder / CONFIG_NAME).read_text())
    (m,) = [m for m in config["methods"] if m["name"] == "ksd"]
    m["tensors"]["layers"]["sha256"] = hashlib.sha256(tensors["ksd.layers"].numpy().tobytes()).hexdigest()
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("layers", [[-100], [7]])
def test_layers_outside_the_model_are_refused_before_attaching(layers, saved, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(Path(saved["light"]).parent / "base")
    folder = ksd_layers(saved["light"], tmp_path / "c", layers)
    with pytest.raises(
        UnlearnFormatError, match=rf"method 'ksd' names layers \[{layers[0]}\], but the model has 2"
    ):
        UnlearnedModelForCausalLM.from_pretrained(folder, base_model=base)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())  # nothing attached


@pytest.mark.parametrize(
    "edit, message",
    [
        (ksd_config("alpha", 1e308), r"alpha must be in \(0, 1e\+06\]"),
        (ksd_config("eps", 5.0), r"eps must be in \(0, 1\]"),
    ],
)
def test_out_of_range_values_are_refused(edit, message, saved, tmp_path):
    folder = edited(saved["light"], tmp_path / "c", edit)
    with pytest.raises(UnlearnFormatError, match=message):
        UnlearnedModelForCausalLM.from_pretrained(folder)


def test_infinite_and_oversized_numbers_in_the_json_text(saved, tmp_path, monkeypatch):
    """``1e999`` parses to inf in Python's json; seeds must fit 64 bits."""
    no_base_load(monkeypatch)

    def na_value(key, literal):
        folder = edited(saved["light"], tmp_path / key, lambda c: None)
        config = json.loads((folder / CONFIG_NAME).read_text())
        config["methods"][0]["config"][key] = "PLACEHOLDER"
        (folder / CONFIG_NAME).write_text(json.dumps(config).replace('"PLACEHOLDER"', literal))
        return folder

    with pytest.raises(UnlearnFormatError, match="eps must be a finite number"):
        UnlearnedModelForCausalLM.from_pretrained(na_value("eps", "1e999"))
    with pytest.raises(UnlearnFormatError, match=r"seed must be in \["):
        UnlearnedModelForCausalLM.from_pretrained(na_value("seed", str(2**70)))


def test_full_layout_with_pickled_base_weights_is_refused(saved, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(saved["full"], tmp_path / "c"))
    base = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(base.state_dict(), folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(UnlearnFormatError, match=r"pickle files \(pytorch_model\.bin\), refused"):
        UnlearnedModelForCausalLM.from_pretrained(folder)
