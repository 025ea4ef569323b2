"""Bad saved models: each fails with a clear error naming the problem, and never leaves a half-loaded model."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import struct
from pathlib import Path

import pytest
import torch
from helpers_persistence import assert_same_outputs, encode, fit_methods, outputs
from safetensors.torch import load_file, save_file
from tiny_models import hook_count, tiny_llama

from unlearn_hf import KeySpaceDetection, SelectivePruningConfig, UnlearnedModelForCausalLM
from unlearn_hf.methods import METHOD_CLASSES
from unlearn_hf.persistence import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    FingerprintMismatchError,
    UnlearnFormatError,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, smol_tokenizer) -> tuple[Path, dict[str, torch.Tensor]]:
    """A light checkpoint (NA then KSD) of ``tiny_llama(seed=0)`` and the outputs it must reproduce."""
    folder = tmp_path_factory.mktemp("saved")
    model = fit_methods(
        UnlearnedModelForCausalLM.from_base(tiny_llama(seed=0)), smol_tokenizer, ("na", "ksd")
    )
    model.save_pretrained(folder, base_model_name_or_path="not-used/in-these-tests")
    return folder, outputs(model, encode(smol_tokenizer))


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    """A fresh copy of the saved checkpoint, free to corrupt."""
    out = tmp_path / "copy"
    out.mkdir()
    for p in saved[0].iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything tries to unpickle."""

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def attach(folder: Path, base=None, **kwargs):
    base = tiny_llama(seed=0) if base is None else base
    return UnlearnedModelForCausalLM.from_pretrained(folder, base_model=base, **kwargs)


def rewrite(folder: Path, mutate) -> None:
    """Rewrite the tensors with ``mutate(tensors)`` and update the config's records consistently (so only the
    method's own validation can object)."""
    tensors = load_file(str(folder / WEIGHTS_NAME))
    mutate(tensors)
    config = json.loads((folder / CONFIG_NAME).read_text())
    metadata = {
        "format": "pt",
        "unlearn_hf.format_version": str(FORMAT_VERSION),
        "unlearn_hf.methods": json.dumps(
            [{"name": m["name"], "method_type": m["method_type"]} for m in config["methods"]]
        ),
    }
    names = {"float32": "F32", "float64": "F64", "int64": "I64"}
    for m in config["methods"]:
        m["tensors"] = {}
        for key, t in tensors.items():
            method, tname = key.split(".", 1)
            if method == m["name"]:
                m["tensors"][tname] = {
                    "dtype": names[str(t.dtype).removeprefix("torch.")],
                    "shape": list(t.shape),
                    "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest(),
                }
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata=metadata)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    edit(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def test_sanity_the_copy_loads(folder, saved, smol_tokenizer):
    assert_same_outputs(saved[1], outputs(attach(folder), encode(smol_tokenizer)))


# -- missing and corrupted files -----------------------------------------------------------------------------------
def test_folder_without_unlearning_files(tmp_path):
    with pytest.raises(UnlearnFormatError, match=f"No {CONFIG_NAME} in .*holds no saved unlearning"):
        UnlearnedModelForCausalLM.from_pretrained(tmp_path)
    tiny_llama().save_pretrained(tmp_path / "plain")
    with pytest.raises(UnlearnFormatError, match="plain transformers model folder"):
        UnlearnedModelForCausalLM.from_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        UnlearnedModelForCausalLM.from_pretrained(str(tmp_path / "nowhere"))


def test_missing_tensor_file(folder):
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(UnlearnFormatError, match=f"{WEIGHTS_NAME} is missing"):
        attach(folder)


def test_corrupted_config_json(folder):
    (folder / CONFIG_NAME).write_text('{"format": "unlearn_hf", "format_version": 1,')
    with pytest.raises(UnlearnFormatError, match="not valid JSON"):
        attach(folder)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_tensor_file(folder, keep):
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(UnlearnFormatError, match="truncated"):
        attach(folder)


def test_corrupted_header_json(folder):
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n]
    i = header.index(b'"dtype"')
    data[8 + i] = ord("{")  # "dtype" -> {dtype": invalid JSON
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(UnlearnFormatError, match="header is corrupted"):
        attach(folder)


@pytest.mark.parametrize("where", ["first", "last"])
def test_bit_flip_in_tensor_data(folder, where):
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    pos = 8 + n if where == "first" else len(data) - 1
    data[pos] ^= 0x04
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(UnlearnFormatError, match="do not match the sha256"):
        attach(folder)


def test_tensor_file_from_another_save(folder, tmp_path, smol_tokenizer):
    # the same methods attached in the other order: its tensor file does not go with our config
    other = fit_methods(
        UnlearnedModelForCausalLM.from_base(tiny_llama(seed=0)), smol_tokenizer, ("ksd", "na")
    )
    other.save_pretrained(tmp_path / "other", base_model_name_or_path="x/y")
    (folder / WEIGHTS_NAME).write_bytes((tmp_path / "other" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(UnlearnFormatError, match="different saves"):
        attach(folder)


# -- invalid contents ----------------------------------------------------------------------------------------------
def test_tensor_missing_from_file_only(folder):
    tensors = load_file(str(folder / WEIGHTS_NAME))
    del tensors["na.forget_std"]
    config = json.loads((folder / CONFIG_NAME).read_text())
    meta = {"format": "pt", "unlearn_hf.format_version": "1"}
    meta["unlearn_hf.methods"] = json.dumps(
        [{"name": m["name"], "method_type": m["method_type"]} for m in config["methods"]]
    )
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata=meta)
    with pytest.raises(
        UnlearnFormatError, match=r"missing tensors listed in unlearn_config.json: \['na.forget_std'\]"
    ):
        attach(folder)


def test_tensor_missing(folder):
    rewrite(folder, lambda t: t.pop("na.retain_mean"))
    with pytest.raises(UnlearnFormatError, match=r"'na'.*missing tensors: \['retain_mean'\]"):
        attach(folder)


def test_tensor_of_wrong_shape(folder):
    rewrite(folder, lambda t: t.update({"ksd.center": torch.cat([t["ksd.center"], t["ksd.center"]], 1)}))
    with pytest.raises(UnlearnFormatError, match="'ksd'.*'(center|scale)' has shape"):
        attach(folder)


def test_tensor_of_wrong_dtype(folder):
    rewrite(folder, lambda t: t.update({"na.score": t["na.score"].double()}))
    with pytest.raises(
        UnlearnFormatError, match="'na'.*'score' has dtype torch.float64, expected torch.float32"
    ):
        attach(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_statistics(folder, value):
    def poison(t):
        t["na.forget_mean"][0] = value

    rewrite(folder, poison)
    with pytest.raises(UnlearnFormatError, match="'na'.*'forget_mean' holds NaN or inf"):
        attach(folder)


def test_newer_format_version(folder):
    edit_config(folder, lambda c: c.update(format_version=FORMAT_VERSION + 1, library_version="9.0"))
    with pytest.raises(UnlearnFormatError, match=f"format version {FORMAT_VERSION + 1}.*Upgrade unlearn_hf"):
        attach(folder)


def test_unknown_method_type(folder):
    edit_config(folder, lambda c: c["methods"][1].update(method_type="telepathy"))
    with pytest.raises(UnlearnFormatError, match="telepathy"):
        attach(folder)


def test_unknown_config_keys_warn_and_load(folder, saved, smol_tokenizer, caplog):
    def add_keys(c):
        c["future_option"] = {"x": 1}
        c["methods"][0]["config"]["future_knob"] = 0.5
        c["methods"][1]["provenance"] = "lab"

    edit_config(folder, add_keys)
    with caplog.at_level(logging.WARNING):
        model = attach(folder)
    text = caplog.text
    assert "future_option" in text and "future_knob" in text and "provenance" in text
    assert_same_outputs(saved[1], outputs(model, encode(smol_tokenizer)))


# -- the wrong base model --------------------------------------------------------------------------------------------
def test_fingerprint_mismatch(folder, saved, smol_tokenizer, caplog):
    other = tiny_llama(seed=1)
    with pytest.raises(
        FingerprintMismatchError, match="input embedding .*weight values differ.*ignore_fingerprint"
    ):
        attach(folder, other)
    assert hook_count(other) == 0 and not isinstance(other, UnlearnedModelForCausalLM)

    deeper = tiny_llama(seed=0, layers=3)
    with pytest.raises(FingerprintMismatchError, match="number of FFL layers: saved 2, model has 3"):
        attach(folder, deeper)

    with caplog.at_level(logging.WARNING):
        forced = attach(folder, other, ignore_fingerprint=True)
    assert "ignore_fingerprint=True" in caplog.text and list(forced.methods) == ["na", "ksd"]


def test_saved_site_names_this_model_lacks_are_a_fingerprint_difference(folder, caplog):
    """Sites saved under other module paths (a checkpoint of another layout): refused as a fingerprint mismatch, or
    attached to the detected sites with ignore_fingerprint=True. When from_base began checking named sites at once,
    the load raised a raw SiteError in both cases (a review)."""

    def rename(config):
        for site in config["base_model"]["fingerprint"]["ffl_sites"]:
            for key in ("pre", "key"):
                if site.get(key):
                    site[key] = site[key].replace("model.layers", "model.decoder.layers")

    edit_config(folder, rename)
    with pytest.raises(FingerprintMismatchError):
        attach(folder)
    with caplog.at_level(logging.WARNING):
        forced = attach(folder, ignore_fingerprint=True)
    assert list(forced.methods) == ["na", "ksd"] and "ignore_fingerprint=True" in caplog.text


def test_failed_attach_leaves_no_hooks(folder):
    # a smaller vocabulary: NA attaches, then KSD's refusal tokens do not fit: all or nothing
    small = tiny_llama(seed=0, vocab_size=500)
    batch = {"input_ids": torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        plain = small(**batch).logits
    assert hook_count(small) == 0
    with pytest.raises(ValueError, match="[Rr]efusal token"):
        attach(folder, small, ignore_fingerprint=True)
    assert hook_count(small) == 0
    with torch.no_grad():
        assert torch.equal(small(**batch).logits, plain)

    # onto an unlearned model: it keeps exactly the methods it had
    wrapper = UnlearnedModelForCausalLM.from_base(small)
    g = torch.Generator().manual_seed(1)
    forget, retain = ([{"input_ids": torch.randint(3, 500, (4, 9), generator=g)}] for _ in range(2))
    wrapper.fit(SelectivePruningConfig(ratio=0.1), forget, retain, name="sp", show_progress=False)
    hooks = hook_count(small)
    with pytest.raises(ValueError, match="[Rr]efusal token"):
        attach(folder, wrapper, ignore_fingerprint=True)
    assert list(wrapper.methods) == ["sp"] and hook_count(small) == hooks


def test_failing_method_is_rolled_back(folder):
    class Boom(RuntimeError):
        pass

    class FailingKSD(KeySpaceDetection):
        def attach(self, model, hooks):
            super().attach(model, hooks)
            raise Boom("attach failed (simulated)")

    class Failing(UnlearnedModelForCausalLM):
        method_classes = {**METHOD_CLASSES, "key_space_detection": FailingKSD}

    base = tiny_llama(seed=0)
    with pytest.raises(Boom):
        Failing.from_pretrained(folder, base_model=base)
    assert hook_count(base) == 0


def test_base_model_loading_arguments_with_base_model(folder):
    with pytest.raises(TypeError, match="dtype.*no effect with base_model"):
        attach(folder, torch_dtype=torch.bfloat16)


# -- pickles are refused, never loaded ----------------------------------------------------------------------------
def test_pickle_renamed_to_safetensors(folder, no_unpickling):
    torch.save({"na.score": torch.zeros(3)}, folder / WEIGHTS_NAME)
    with pytest.raises(UnlearnFormatError, match="zip archive.*not a safetensors file.*never unpickles"):
        attach(folder)
    (folder / WEIGHTS_NAME).write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(UnlearnFormatError, match="Python pickle"):
        attach(folder)


@pytest.mark.parametrize("name", ["unlearn_model.bin", "unlearn_model.pt"])
def test_pickle_file_instead_of_safetensors(folder, name, no_unpickling):
    (folder / WEIGHTS_NAME).unlink()
    torch.save({"na.score": torch.zeros(3)}, folder / name)
    with pytest.raises(UnlearnFormatError, match=f"{name}.*pickle-based files are refused"):
        attach(folder)
    with pytest.raises(UnlearnFormatError, match="is a file.*Pickle-based files are refused"):
        UnlearnedModelForCausalLM.from_pretrained(folder / name)


# -- bad saves ------------------------------------------------------------------------------------------------------
def test_bad_saves(tmp_path, smol_tokenizer):
    empty = UnlearnedModelForCausalLM.from_base(tiny_llama())
    with pytest.raises(ValueError, match="no unlearning method is attached"):
        empty.save_pretrained(tmp_path / "a")
    model = fit_methods(UnlearnedModelForCausalLM.from_base(tiny_llama()), smol_tokenizer, ("sp",))
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        model.save_pretrained(tmp_path / "b")  # built from a config: a light save could not find it again
    with pytest.raises(ValueError, match="never pickle"):
        model.save_pretrained(tmp_path / "c", save_base_model=True, safe_serialization=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        model.save_pretrained(tmp_path / "file", save_base_model=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_light_save_into_the_folder_its_base_model_name_points_to(tmp_path, smol_tokenizer, monkeypatch):
    """A base model loaded from the Hub id ``org/base`` and saved light into the relative folder ``org/base``:
    loading would look for the base model in that folder, which holds none (a review). Refused before writing."""
    monkeypatch.chdir(tmp_path)
    model = fit_methods(UnlearnedModelForCausalLM.from_base(tiny_llama(seed=0)), smol_tokenizer, ("sp",))
    model.get_base_model().config._name_or_path = "org/base"
    with pytest.raises(ValueError, match="is also the path of this folder"):
        model.save_pretrained("org/base")
    assert not (tmp_path / "org").exists()
    (tmp_path / "org" / "base").mkdir(parents=True)  # made beforehand, empty: the same
    with pytest.raises(ValueError, match="is also the path of this folder"):
        model.save_pretrained("org/base")
    (tmp_path / "org" / "base").rmdir()
    (tmp_path / "org").rmdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "org").symlink_to(tmp_path / "real")  # a link on the way: the same folder
    with pytest.raises(ValueError, match="is also the path of this folder"):
        model.save_pretrained("real/base")
    assert list((tmp_path / "real").iterdir()) == []
    model.save_pretrained("elsewhere")  # the same model saves light anywhere else
    assert (
        json.loads((tmp_path / "elsewhere" / CONFIG_NAME).read_text())["base_model"]["name_or_path"]
        == "org/base"
    )


def test_a_base_model_folder_without_a_model(saved, tmp_path):
    """The recorded base is a folder that holds no model: the error says which base model of which checkpoint."""
    folder, _ = saved
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"Could not load the base model .*empty.* of the unlearned model"):
        UnlearnedModelForCausalLM.from_pretrained(folder, base_model_name_or_path=str(empty))


@pytest.mark.parametrize("header_len", [1152, 1408])
def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(
    folder, saved, smol_tokenizer, header_len
):
    """A safetensors file starts with its header's length: 1152 is b"\\x80\\x04...", a pickle's opening bytes; the
    header's "{" at byte 8 tells them apart (a review: such valid saves were refused as pickles)."""
    path = folder / WEIGHTS_NAME
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header, tensors = data[8 : 8 + n].rstrip(), data[8 + n :]
    assert len(header) <= header_len
    path.write_bytes(struct.pack("<Q", header_len) + header.ljust(header_len) + tensors)
    assert path.read_bytes()[:2] in (b"\x80\x04", b"\x80\x05")
    loaded = UnlearnedModelForCausalLM.from_pretrained(folder, base_model=tiny_llama(seed=0))
    assert_same_outputs(saved[1], outputs(loaded, encode(smol_tokenizer)))


def test_an_older_fingerprint_without_values_loads_with_a_warning(folder, saved, smol_tokenizer, caplog):
    """A checkpoint saved (by an earlier version) from a model whose weights were offloaded recorded no values:
    only the architecture can be checked; it loads on its base with a warning, as before (a review)."""
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text())
    fingerprint = config["base_model"]["fingerprint"]
    for w in fingerprint["weights"]:
        w["sha256"], w["sample"] = None, None
    for record in fingerprint["parameters"]:
        record[3], record[4] = None, None
    path.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        loaded = UnlearnedModelForCausalLM.from_pretrained(folder, base_model=tiny_llama(seed=0))
    assert "records no weight values" in caplog.text
    assert_same_outputs(saved[1], outputs(loaded, encode(smol_tokenizer)))
