"""Saving and loading unlearned models: round trips, both layouts, the file format, atomic saves."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers_persistence import assert_same_methods, assert_same_outputs, encode, fit_methods, outputs
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM

import unlearn_hf
from unlearn_hf import NeuronAdjust, UnlearnedModelForCausalLM
from unlearn_hf.methods import METHOD_CLASSES
from unlearn_hf.persistence import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME

COMBOS = [("na",), ("ksd",), ("sp",), ("na", "ksd", "sp")]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved as a transformers folder (so that the base model has a name to be found by)."""
    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_llama(seed=0).save_pretrained(folder)
    return folder


def load_base(base_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


@pytest.fixture
def batch(smol_tokenizer):
    return encode(smol_tokenizer)


# -- round trips -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_round_trip_light(names, base_dir, smol_tokenizer, batch, tmp_path):
    model = fit_methods(UnlearnedModelForCausalLM.from_base(load_base(base_dir)), smol_tokenizer, names)
    before = outputs(model, batch)
    with model.disable_unlearning():
        plain = model(**batch).logits
    assert not torch.equal(plain, before["logits"])  # the methods do change the model
    if "ksd" in names:
        assert before["abstained"].tolist() == [True, False]

    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert loaded.get_base_model() is not model.get_base_model()
    assert_same_methods(model, loaded)
    assert_same_outputs(before, outputs(loaded, batch))


def test_round_trip_full_layout(smol_tokenizer, batch, tmp_path):
    # a base built from a config has no name: only the full layout can be loaded again
    model = fit_methods(
        UnlearnedModelForCausalLM.from_base(tiny_llama(seed=5)), smol_tokenizer, ("na", "ksd")
    )
    before = outputs(model, batch)
    model.save_pretrained(tmp_path / "full", save_base_model=True)
    files = {p.name for p in (tmp_path / "full").iterdir()}
    assert {CONFIG_NAME, WEIGHTS_NAME, "config.json", "model.safetensors"} <= files
    saved = json.loads((tmp_path / "full" / CONFIG_NAME).read_text())
    assert saved["layout"] == "full"
    assert set(saved["companion_files"]) == files - {CONFIG_NAME, WEIGHTS_NAME}

    loaded = UnlearnedModelForCausalLM.from_pretrained(str(tmp_path / "full"))
    base_a, base_b = model.get_base_model().state_dict(), loaded.get_base_model().state_dict()
    assert base_a.keys() == base_b.keys() and all(torch.equal(base_a[k], base_b[k]) for k in base_a)
    assert_same_methods(model, loaded)
    assert_same_outputs(before, outputs(loaded, batch))


def test_keyword_calling_convention_and_dtype(base_dir, smol_tokenizer, tmp_path):
    model = fit_methods(
        UnlearnedModelForCausalLM.from_base(load_base(base_dir)), smol_tokenizer, ("na", "sp")
    )
    model.save_pretrained(tmp_path / "saved")
    # the way transformers-based tools call it
    loaded = UnlearnedModelForCausalLM.from_pretrained(
        pretrained_model_name_or_path=str(tmp_path / "saved"), torch_dtype=torch.bfloat16
    )
    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.get_base_model().parameters())
    assert_same_methods(model, loaded)  # a bf16 base passes the fingerprint check (tolerant across dtypes)
    also = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert also.dtype == torch.bfloat16


def test_attach_to_model_in_memory(base_dir, smol_tokenizer, batch, tmp_path):
    model = fit_methods(
        UnlearnedModelForCausalLM.from_base(load_base(base_dir)), smol_tokenizer, ("na", "ksd")
    )
    before = outputs(model, batch)
    model.save_pretrained(tmp_path / "saved")

    base = load_base(base_dir)
    with torch.no_grad():
        plain = base(**batch).logits
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "saved", base_model=base)
    assert loaded.get_base_model() is base and type(base).__name__ == "LlamaForCausalLM"
    assert not isinstance(base, UnlearnedModelForCausalLM)
    assert_same_outputs(before, outputs(loaded, batch))
    with torch.no_grad():
        assert torch.equal(base(**batch).logits, plain)  # the base object stays the plain model

    # onto an unlearned model: the saved methods are added to the ones it has
    target = UnlearnedModelForCausalLM.from_base(load_base(base_dir))
    fit_methods(target, smol_tokenizer, ("sp",))
    same = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "saved", base_model=target)
    assert same is target and list(target.methods) == ["sp", "na", "ksd"]
    with pytest.raises(ValueError, match="already attached"):
        UnlearnedModelForCausalLM.from_pretrained(tmp_path / "saved", base_model=target)
    assert list(target.methods) == ["sp", "na", "ksd"]


def test_user_subclass_and_its_method_classes(base_dir, smol_tokenizer, batch, tmp_path):
    class MyNeuronAdjust(NeuronAdjust):
        pass

    class MyUnlearned(UnlearnedModelForCausalLM):
        method_classes = {**METHOD_CLASSES, "neuron_adjust": MyNeuronAdjust}

    model = fit_methods(UnlearnedModelForCausalLM.from_base(load_base(base_dir)), smol_tokenizer, ("na",))
    before = outputs(model, batch)
    model.save_pretrained(tmp_path / "saved")
    loaded = MyUnlearned.from_pretrained(tmp_path / "saved")
    assert isinstance(loaded, MyUnlearned) and type(loaded.methods["na"]) is MyNeuronAdjust
    assert_same_outputs(before, outputs(loaded, batch))


# -- the files ---------------------------------------------------------------------------------------------------
def _read_safetensors_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def test_file_contents_match_format_md(base_dir, smol_tokenizer, tmp_path):
    model = fit_methods(
        UnlearnedModelForCausalLM.from_base(load_base(base_dir)), smol_tokenizer, ("ksd", "na", "sp")
    )
    model.save_pretrained(tmp_path / "saved", forget_data="5 arithmetic strings", retain_data="5 sentences")
    saved = json.loads((tmp_path / "saved" / CONFIG_NAME).read_text())
    assert saved["format"] == "unlearn_hf" and saved["format_version"] == FORMAT_VERSION
    assert saved["library_version"] == unlearn_hf.__version__
    assert saved["layout"] == "light" and saved["companion_files"] == []
    assert saved["base_model"]["name_or_path"] == str(base_dir.resolve())
    assert (saved["forget_data"], saved["retain_data"]) == ("5 arithmetic strings", "5 sentences")
    assert [m["name"] for m in saved["methods"]] == ["ksd", "na", "sp"]  # attach order
    for entry in saved["methods"]:
        method = model.methods[entry["name"]]
        assert {"method_type": entry["method_type"], **entry["config"]} == method.config.to_dict()

    header, body = _read_safetensors_header(tmp_path / "saved" / WEIGHTS_NAME)
    meta = header.pop("__metadata__")
    assert meta["unlearn_hf.format_version"] == str(FORMAT_VERSION)
    assert json.loads(meta["unlearn_hf.methods"]) == [
        {"name": m["name"], "method_type": m["method_type"]} for m in saved["methods"]
    ]
    expected_keys = {f"{m['name']}.{t}" for m in saved["methods"] for t in m["tensors"]}
    assert set(header) == expected_keys
    for entry in saved["methods"]:
        state = model.methods[entry["name"]].state_dict()
        assert set(entry["tensors"]) == set(state)
        for tname, rec in entry["tensors"].items():
            tensor = state[tname]
            # independent: numpy little-endian bytes of the tensor
            digest = hashlib.sha256(tensor.numpy().astype(tensor.numpy().dtype.newbyteorder("<")).tobytes())
            assert rec["sha256"] == digest.hexdigest()
            assert rec["shape"] == list(tensor.shape)
            start, end = header[f"{entry['name']}.{tname}"]["data_offsets"]
            assert hashlib.sha256(body[start:end]).hexdigest() == rec["sha256"]


def test_the_same_fit_saves_the_same_bytes(base_dir, smol_tokenizer, tmp_path):
    """safetensors writes its header metadata in a per-process random order (three keys here: six orders), so each
    save of the same fit made another file and push_to_hub uploaded it again; the keys are written sorted."""
    model = fit_methods(
        UnlearnedModelForCausalLM.from_base(load_base(base_dir)), smol_tokenizer, ("ksd", "na", "sp")
    )
    files = set()
    for i in range(5):
        model.save_pretrained(tmp_path / f"s{i}")
        files.add((tmp_path / f"s{i}" / WEIGHTS_NAME).read_bytes())
    assert len(files) == 1
    header, _ = _read_safetensors_header(tmp_path / "s0" / WEIGHTS_NAME)
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    size = struct.unpack("<Q", next(iter(files))[:8])[0]
    assert size % 8 == 0  # the data section stays aligned as safetensors writes it
    loaded = safetensors.torch.load_file(tmp_path / "s0" / WEIGHTS_NAME)
    for name, method in model.methods.items():
        for key, tensor in method.state_dict().items():
            assert torch.equal(loaded[f"{name}.{key}"], tensor.cpu())


def test_fingerprint_slices_are_what_format_md_says(base_dir, smol_tokenizer, tmp_path):
    base = load_base(base_dir)
    model = fit_methods(UnlearnedModelForCausalLM.from_base(base), smol_tokenizer, ("sp",))
    model.save_pretrained(tmp_path / "saved")
    fp = json.loads((tmp_path / "saved" / CONFIG_NAME).read_text())["base_model"]["fingerprint"]
    cfg = base.config
    assert (fp["model_type"], fp["num_layers"], fp["vocab_size"], fp["hidden_size"]) == (
        "llama",
        cfg.num_hidden_layers,
        cfg.vocab_size,
        cfg.hidden_size,
    )
    layers = base.model.layers
    assert [s["key"] for s in fp["ffl_sites"]] == [
        f"model.layers.{i}.mlp.down_proj" for i in range(len(layers))
    ]
    assert all(s["d_ff"] == cfg.intermediate_size for s in fp["ffl_sites"])
    slices = {
        "input embedding": base.model.embed_tokens.weight,
        "first FFL key projection": layers[0].mlp.down_proj.weight,
        "last FFL key projection": layers[-1].mlp.down_proj.weight,
    }
    assert [w["label"] for w in fp["weights"]] == list(slices)
    for entry in fp["weights"]:
        rows = slices[entry["label"]].detach()[:4].float().numpy().astype("<f4")
        assert entry["sha256"] == hashlib.sha256(rows.tobytes()).hexdigest()
    # every parameter: the first row (all of a 1-D one), 16 hex digits of its float32 SHA-256, 4 values; one record
    # per line of the file
    lines = (tmp_path / "saved" / CONFIG_NAME).read_text().splitlines()
    assert sum(line.lstrip().startswith('["') for line in lines) == len(fp["parameters"])
    params = dict(base.named_parameters())
    assert [r[0] for r in fp["parameters"]] == list(params)
    for name, dtype, shape, digest, sample in fp["parameters"]:
        p = params[name].detach()
        row = p.reshape(-1, p.shape[-1])[0].float().numpy().astype("<f4")
        assert (dtype, shape) == ("float32", list(p.shape))
        assert digest == hashlib.sha256(row.tobytes()).hexdigest()[:16]
        assert sample == [float(row[i]) for i in np.round(np.linspace(0, row.size - 1, 4)).astype(int)]


# -- atomic saves ------------------------------------------------------------------------------------------------
def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".unlearn-tmp-" in p.name]


def test_crash_while_writing_tensors_keeps_old_content(
    base_dir, smol_tokenizer, batch, tmp_path, monkeypatch
):
    old = fit_methods(UnlearnedModelForCausalLM.from_base(load_base(base_dir)), smol_tokenizer, ("na",))
    old.save_pretrained(tmp_path / "saved")
    expected = outputs(old, batch)
    new = fit_methods(UnlearnedModelForCausalLM.from_base(load_base(base_dir)), smol_tokenizer, ("ksd", "sp"))

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        new.save_pretrained(tmp_path / "saved")
    with pytest.raises(OSError, match="simulated"):
        new.save_pretrained(tmp_path / "fresh")
    monkeypatch.undo()

    assert _leftovers(tmp_path) == [] and not (tmp_path / "fresh").exists()
    assert_same_outputs(
        expected, outputs(UnlearnedModelForCausalLM.from_pretrained(tmp_path / "saved"), batch)
    )


def test_overwrite_removes_only_stale_companion_files(smol_tokenizer, base_dir, batch, tmp_path):
    model = fit_methods(UnlearnedModelForCausalLM.from_base(load_base(base_dir)), smol_tokenizer, ("sp",))
    folder = tmp_path / "saved"
    model.save_pretrained(folder, save_base_model=True)
    (folder / "notes.txt").write_text("mine")
    model.save_pretrained(folder)  # now light: the base model files of the previous save go
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "notes.txt"])
    assert_same_outputs(
        outputs(model, batch), outputs(UnlearnedModelForCausalLM.from_pretrained(folder), batch)
    )


# -- found by a review of saving and publishing ------------------------------------------------------------------
def test_a_light_save_into_the_full_checkpoint_the_base_came_from_is_refused(tmp_path, smol_tokenizer):
    """Loading a full checkpoint and saving it back light into its folder would replace the folder and delete the
    base model's weights; it is refused and the folder stays loadable. A full save there works."""
    folder = tmp_path / "full"
    model = fit_methods(UnlearnedModelForCausalLM.from_base(tiny_llama()), smol_tokenizer, ("na", "ksd"))
    model.save_pretrained(folder, save_base_model=True)
    before = sorted(p.name for p in folder.iterdir())
    loaded = UnlearnedModelForCausalLM.from_pretrained(folder)
    loaded.remove_method("ksd")
    with pytest.raises(ValueError, match="full checkpoint the base model was loaded from"):
        loaded.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    loaded.save_pretrained(folder, save_base_model=True)
    again = UnlearnedModelForCausalLM.from_pretrained(folder)
    assert sorted(again.methods) == ["na"]
    batch = encode(smol_tokenizer)
    assert torch.equal(outputs(again, batch)["logits"], outputs(loaded, batch)["logits"])


def test_a_full_save_over_another_models_weights_drops_them(tmp_path, smol_tokenizer):
    """A sharded full save into a folder holding another model's ``model.safetensors``: the stale file would
    shadow the new shards, so it is not kept, and the folder loads as the saved model."""
    folder = tmp_path / "shared"
    tiny_llama(layers=3, seed=7).save_pretrained(folder)  # another model's single-file weights
    model = fit_methods(UnlearnedModelForCausalLM.from_base(tiny_llama()), smol_tokenizer, ("na",))
    model.save_pretrained(folder, save_base_model=True, max_shard_size="20KB")
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    loaded = UnlearnedModelForCausalLM.from_pretrained(folder)
    batch = encode(smol_tokenizer)
    assert torch.equal(outputs(loaded, batch)["logits"], outputs(model, batch)["logits"])


def test_a_light_push_of_a_local_base_is_refused_before_any_request(tmp_path, smol_tokenizer):
    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = fit_methods(UnlearnedModelForCausalLM.from_base(base), smol_tokenizer, ("na",))
    with pytest.raises(ValueError, match="local folder .* loads nowhere else"):
        model.push_to_hub("user/light")  # raises before the Hub is asked anything
    # a base folder moved away since: its absolute path names no repo either (the CLI refused it, the API did not)
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(ValueError, match="local folder .* loads nowhere else"):
        model.push_to_hub("user/light")
