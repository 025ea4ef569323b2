"""Models dispatched by accelerate (``device_map`` with CPU and disk offload) fit and generate like plain ones."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import dispatch_model
from tiny_models import tiny_llama
from transformers import AutoModelForCausalLM

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
    find_ffl_sites,
)
from unlearn_hf.sites import module_device

#: Layers 1 and 2 and the LM head live on disk (weights on "meta" until accelerate loads them for a forward).
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}
OFFLOADED = (1, 2)

FORGET = [f"Question: what is {i} plus {3 * i + 1}?\nAnswer: {4 * i + 1}" for i in range(9)]
RETAIN = [f"def scale_{i}(values):\n    return [v * {i} for v in values]" for i in range(7)]
QUERIES = [f"Question: what is {i} times {i + 2}?\nAnswer:" for i in range(8)]
OTHER = ["import os\nfor root, dirs, files in os.walk('.'):\n    print(root)", "Bonjour, je m'appelle Marie."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_ckpt")
    tiny_llama(layers=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["from_pretrained", "dispatch_model"])
def models(request, checkpoint, tmp_path_factory):
    """``(plain, dispatched)``: the same checkpoint, undispatched and dispatched with disk offload."""
    plain = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    offload = tmp_path_factory.mktemp("offload")
    if request.param == "from_pretrained":
        dispatched = AutoModelForCausalLM.from_pretrained(
            checkpoint, device_map=DEVICE_MAP, offload_folder=offload
        ).eval()
    else:
        dispatched = dispatch_model(
            AutoModelForCausalLM.from_pretrained(checkpoint).eval(),
            device_map=DEVICE_MAP,
            offload_dir=str(offload),
            main_device="cpu",
        )
    return plain, dispatched


def offloaded_on_meta(model) -> bool:
    return all(model.model.layers[i].mlp.gate_proj.weight.device.type == "meta" for i in OFFLOADED)


def fit_all(model, tokenizer):
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    kw = dict(batch_size=4, max_length=64, show_progress=False)
    # NA and SP after the KSD layer, so that they do not move the keys KSD was fitted on (base-model keys)
    na = NeuronAdjustConfig(ratio=0.1, deterministic=True, layers=[2])
    unlearned.fit(na, FORGET, RETAIN, tokenizer, **kw)
    unlearned.fit(SelectivePruningConfig(ratio=0.1, layers=[2]), FORGET, RETAIN, tokenizer, **kw)
    # alpha 1.5: at 1 the fitted queries lie on the hypercube's faces, and generating with left padding (the fit
    # padded on the right) moves float32 keys by a few ulps
    unlearned.fit(KeySpaceDetectionConfig(layers=[1], alpha=1.5), QUERIES, None, tokenizer, **kw)
    return unlearned


def test_sites_are_found_and_run_on_the_execution_device(models):
    plain, dispatched = models
    assert offloaded_on_meta(dispatched)  # the offload really happened
    got, ref = find_ffl_sites(dispatched), find_ffl_sites(plain)
    assert [(s.pre_name, s.key_name, s.d_ff) for s in got] == [(s.pre_name, s.key_name, s.d_ff) for s in ref]
    for s in got:  # not the parameters' "meta": accelerate's execution device
        assert module_device(s.pre) == module_device(s.key) == torch.device("cpu")


def test_fit_and_generation_match_the_undispatched_model(models, smol_tokenizer):
    plain, dispatched = models
    fitted = {name: fit_all(m, smol_tokenizer) for name, m in (("plain", plain), ("dispatched", dispatched))}
    try:
        ref, got = fitted["plain"], fitted["dispatched"]
        assert offloaded_on_meta(dispatched)  # probing (which stops forwards early) left nothing loaded
        for name, method in ref.methods.items():
            for key, value in method.state_dict().items():
                assert torch.equal(got.methods[name].state_dict()[key], value), (name, key)
        na = got.attachments["neuron_adjust"]
        assert list(na.layers) == [2]
        for layer in na.layers.values():  # tensors on the offloaded layer's execution device, not "meta"
            assert layer.neurons.device == torch.device("cpu")
        assert got.attachments["selective_pruning"].layers[2].neurons.device == torch.device("cpu")
        assert got.attachments["key_space_detection"].layers[1].center.device == torch.device("cpu")

        tok = copy.deepcopy(smol_tokenizer)
        tok.padding_side = "left"
        enc = tok(QUERIES[:3] + OTHER, return_tensors="pt", padding=True)
        gen = dict(
            max_new_tokens=10, do_sample=False, return_dict_in_generate=True, pad_token_id=tok.pad_token_id
        )
        out = {name: u.generate(**enc, **gen) for name, u in fitted.items()}
        assert torch.equal(out["dispatched"].sequences, out["plain"].sequences)
        assert torch.equal(out["dispatched"].abstained, out["plain"].abstained)
        abstained = out["plain"].abstained
        assert abstained[:3].all() and not abstained[3:].any()  # fitted queries refuse, the others do not
        refusal = tok("I can't help with that.", add_special_tokens=False)["input_ids"]
        new = out["dispatched"].sequences[:, enc["input_ids"].shape[1] :]
        assert new[0, : len(refusal)].tolist() == refusal

        # NA + SP change the activations identically on both (abstention off to see them)
        logits = {}
        for name, u in fitted.items():
            with u.disable_abstention():
                logits[name] = u(**enc).logits
        base = plain(**enc).logits
        assert torch.equal(logits["dispatched"], logits["plain"])
        assert not torch.allclose(logits["plain"], base, atol=1e-4)
        assert torch.equal(dispatched(**enc).logits, base)  # the base model itself stays plain
    finally:
        for u in fitted.values():
            u.remove_all_methods()


def test_direct_forward_applies_unlearning_on_a_dispatched_model(models, smol_tokenizer):
    _, dispatched = models
    unlearned = UnlearnedModelForCausalLM.from_base(dispatched)
    try:
        unlearned.fit(NeuronAdjustConfig(ratio=0.05, deterministic=True), FORGET, RETAIN, smol_tokenizer)
        enc = smol_tokenizer(FORGET[:2], return_tensors="pt", padding=True)
        assert torch.equal(unlearned.forward(**enc).logits, unlearned(**enc).logits)
    finally:
        unlearned.remove_all_methods()


def test_fully_offloaded_model_fits_like_the_plain_one():
    """``accelerate.cpu_offload``: every weight, the input embedding's included, waits on "meta"; inputs go to the
    execution device, and the fit and the unlearned model's logits are the plain model's."""
    from accelerate import cpu_offload
    from helpers_na import token_batches

    forget, retain = token_batches(0, 3, 400, n=2), token_batches(1, 30000, 49000, n=2)
    fitted = {}
    for offload in (False, True):
        model = tiny_llama(seed=4)
        if offload:
            cpu_offload(model, execution_device=torch.device("cpu"))
            assert model.get_input_embeddings().weight.is_meta
        unlearned = UnlearnedModelForCausalLM.from_base(model)
        na = unlearned.fit(
            NeuronAdjustConfig(ratio=0.1, deterministic=True), forget, retain, show_progress=False
        )
        with torch.no_grad():
            fitted[offload] = (na.state, unlearned(**forget[0]).logits)
    for name, value in fitted[False][0].items():
        torch.testing.assert_close(fitted[True][0][name], value, msg=name)
    torch.testing.assert_close(fitted[True][1], fitted[False][1])


def test_the_fingerprint_reads_offloaded_weights(checkpoint, tmp_path, smol_tokenizer):
    """Disk-offloaded weights wait on "meta": the fingerprint reads them where accelerate keeps them, so a checkpoint
    saved from an offloaded model, or loaded onto one, is still checked against its base model (a review: both
    attached to another model with a warning only); a model with no weights anywhere cannot be checked: refused."""
    from accelerate import init_empty_weights

    from unlearn_hf.persistence import FingerprintMismatchError

    other = tmp_path / "other"
    tiny_llama(layers=3, seed=9).save_pretrained(other)
    offload = dict(device_map=DEVICE_MAP, offload_folder=tmp_path / "offload")
    dispatched = AutoModelForCausalLM.from_pretrained(checkpoint, **offload).eval()
    unlearned = UnlearnedModelForCausalLM.from_base(dispatched)
    unlearned.fit(SelectivePruningConfig(ratio=0.2), FORGET, RETAIN, smol_tokenizer, show_progress=False)
    saved = tmp_path / "unlearned"
    unlearned.save_pretrained(saved)
    unlearned.remove_all_methods()
    assert offloaded_on_meta(dispatched)
    other_offloaded = AutoModelForCausalLM.from_pretrained(
        other, device_map=DEVICE_MAP, offload_folder=tmp_path / "offload-other"
    )
    for base in (str(other), other_offloaded):
        kwargs = {"base_model_name_or_path": base} if isinstance(base, str) else {"base_model": base}
        with pytest.raises(FingerprintMismatchError, match="values of .* parameters differ"):
            UnlearnedModelForCausalLM.from_pretrained(saved, **kwargs)
    reload = dict(device_map=DEVICE_MAP, offload_folder=tmp_path / "offload-reload")
    for kwargs in ({}, reload):  # its own base, plain or offloaded
        assert list(UnlearnedModelForCausalLM.from_pretrained(saved, **kwargs).methods) == [
            "selective_pruning"
        ]
    config = AutoModelForCausalLM.from_pretrained(checkpoint).config
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config)
    with pytest.raises(FingerprintMismatchError, match="no weight values could be compared"):
        UnlearnedModelForCausalLM.from_pretrained(saved, base_model=empty)


@pytest.mark.parametrize("config", [NeuronAdjustConfig(ratio=0.2), KeySpaceDetectionConfig(alpha=1.0)])
def test_a_model_whose_weights_were_never_loaded_is_refused_before_probing(config):
    """A model built on the meta device (``init_empty_weights``) failed deep in the probe with "Tensor.item() cannot
    be called on meta tensors"; it is refused up front, by name, and nothing is attached. Offloaded weights (meta
    parameters under accelerate's hooks) still fit: the tests above."""
    from tiny_models import tiny_tokenizer

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_llama(vocab_size=128).config)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight is on the meta device"):
        unlearned.fit(
            config, ["x y z", "q r s", "t u v"], ["a b c", "d e f"], tiny_tokenizer(), show_progress=False
        )
    assert dict(unlearned.methods) == {}
    # the weights assigned, the rotary table (a buffer no state dict holds) left on meta: named too (a review)
    model.load_state_dict(tiny_llama(vocab_size=128).state_dict(), assign=True)
    with pytest.raises(ValueError, match=r"rotary_emb.inv_freq is on the meta device"):
        unlearned.fit(
            config, ["x y z", "q r s", "t u v"], ["a b c", "d e f"], tiny_tokenizer(), show_progress=False
        )
    assert dict(unlearned.methods) == {}


def test_an_offloaded_experts_slice_is_hashed(tmp_path):
    """The fingerprint's key-projection slices of a mixture of experts are one expert's rows of a 3-D weight, a view
    named ``...experts.down_proj[e].weight``: offloaded, they were never hashed (that name is no parameter for
    accelerate's offload map), so a checkpoint loaded onto a model whose sliced expert differs, with either side
    offloaded (a review). Now the view is taken of the offloaded weight: refused every way, its own base accepted."""
    from accelerate import cpu_offload
    from helpers_na import token_batches
    from test_moe import moe_model

    from unlearn_hf.persistence import FingerprintMismatchError

    def base(changed: bool, offload: bool):
        model = moe_model("mixtral")
        if changed:  # the last site's expert only (its down rows are all the slice holds of the last layer)
            experts, last = model.model.layers[-1].mlp.experts, model.config.num_local_experts - 1
            with torch.no_grad():
                experts.down_proj[last].normal_(0, 0.5)
        if offload:
            cpu_offload(model, execution_device=torch.device("cpu"))
            assert model.model.layers[-1].mlp.experts.down_proj.is_meta
        return model

    saved = {}
    for offload in (False, True):
        unlearned = UnlearnedModelForCausalLM.from_base(base(False, offload))
        unlearned.fit(
            SelectivePruningConfig(ratio=0.1),
            token_batches(0, 3, 64, n=1),
            token_batches(1, 64, 128, n=1),
            show_progress=False,
        )
        saved[offload] = tmp_path / f"fitted-offloaded-{offload}"
        unlearned.save_pretrained(saved[offload], save_base_model=False, base_model_name_or_path="tiny")
    for fitted_offloaded, path in saved.items():
        for offload in (False, True):
            with pytest.raises(FingerprintMismatchError, match=r"experts\.down_proj\[\d+\]\.weight"):
                UnlearnedModelForCausalLM.from_pretrained(path, base_model=base(True, offload))
            loaded = UnlearnedModelForCausalLM.from_pretrained(path, base_model=base(False, offload))
            assert list(loaded.methods) == ["selective_pruning"], (fitted_offloaded, offload)
