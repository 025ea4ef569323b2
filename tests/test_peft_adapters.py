"""PEFT adapters: what a user with a LoRA-tuned model does. Unmerged adapters are refused where the unlearning would
describe other activations than the saved base model's (wrapping, fitting, a full save), with the way out; a merged
model fits, saves and loads; LoRA added on top of an unlearned model leaves its methods acting."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from tiny_models import hook_count, random_batches, tiny_llama

from unlearn_hf import NeuronAdjustConfig, SelectivePruningConfig, UnlearnedModelForCausalLM
from unlearn_hf.persistence import FingerprintMismatchError

VOCAB = 512


FORGET, RETAIN = random_batches(1, VOCAB), random_batches(2, VOCAB)
PROMPT = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))


def lora(model, targets=("gate_proj", "down_proj"), init=False):
    """``model`` with LoRA on ``targets``; ``init=False``: random B, so the adapters change the outputs."""
    config = peft.LoraConfig(r=4, target_modules=list(targets), init_lora_weights=init)
    return peft.get_peft_model(model, config)


def test_peft_model_refused_with_the_way_out():
    model = lora(tiny_llama(vocab_size=VOCAB))
    with pytest.raises(
        TypeError, match=r"PeftModel is a PEFT model; merge the adapters .*merge_and_unload\(\)"
    ):
        UnlearnedModelForCausalLM.from_base(model)


def test_model_with_adapter_layers_refused_and_left_unchanged():
    """``get_base_model()`` of a PEFT model is a transformers model whose projections are LoRA layers: a light
    checkpoint fitted on it would reload onto the plain base (the fingerprint reads the base layers' weights)."""
    inner = lora(tiny_llama(vocab_size=VOCAB)).get_base_model()
    before = hook_count(inner)
    with pytest.raises(
        ValueError, match=r"4 of its modules are PEFT adapter layers \(model\.layers\.0\.mlp\.gate_proj"
    ):
        UnlearnedModelForCausalLM.from_base(inner)
    assert hook_count(inner) == before
    assert not hasattr(inner, "_unlearn_methods")


def test_merged_model_fits_saves_and_loads(tmp_path):
    """The way out: ``merge_and_unload()`` gives a plain model. Saved light, its checkpoint names the base, whose
    weights are not the merged ones: loading says so and names save_base_model=True, which then round-trips."""
    base_dir = tmp_path / "base"
    tiny_llama(vocab_size=VOCAB).save_pretrained(base_dir)
    base = type(tiny_llama(vocab_size=VOCAB)).from_pretrained(base_dir)
    merged = lora(base).merge_and_unload()
    assert type(merged) is type(base)
    model = UnlearnedModelForCausalLM.from_base(merged)
    model.fit(NeuronAdjustConfig(ratio=0.1, deterministic=True), FORGET, RETAIN, show_progress=False)
    with model.disable_unlearning():
        plain = model(PROMPT).logits
    adjusted = model(PROMPT).logits
    assert not torch.equal(plain, adjusted)

    model.save_pretrained(tmp_path / "light")
    with pytest.raises(FingerprintMismatchError, match="merged PEFT adapters.*save_base_model=True"):
        UnlearnedModelForCausalLM.from_pretrained(tmp_path / "light")
    model.save_pretrained(tmp_path / "full", save_base_model=True)
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(loaded(PROMPT).logits, adjusted, rtol=0, atol=0)


def test_lora_on_top_of_an_unlearned_model(tmp_path):
    """Fine-tuning an unlearned model with LoRA: the methods keep acting (on the base projections' outputs) through the
    PEFT wrapper; refitting or a full save with the adapter layers in place is refused, a light save (the
    unlearning, which belongs to the base weights, recorded under their plain names) is not, and loads onto the
    plain base."""
    tiny_llama(vocab_size=VOCAB).save_pretrained(tmp_path / "base")
    base = type(tiny_llama(vocab_size=VOCAB)).from_pretrained(tmp_path / "base")
    names = [n for n, _ in base.named_parameters()]  # before PEFT wraps its modules in place
    model = UnlearnedModelForCausalLM.from_base(base)
    model.fit(NeuronAdjustConfig(ratio=0.1, deterministic=True), FORGET, RETAIN, show_progress=False)
    with model.disable_unlearning():
        plain = model(PROMPT).logits
    adjusted = model(PROMPT).logits
    tuned = lora(model, targets=("q_proj", "gate_proj"), init=True)  # B = 0: the adapters add nothing yet
    torch.testing.assert_close(tuned(input_ids=PROMPT).logits, adjusted, rtol=0, atol=0)
    assert not torch.equal(adjusted, plain)

    with pytest.raises(ValueError, match="Cannot fit unlearning methods on this model: 4 of its modules"):
        model.fit(SelectivePruningConfig(ratio=0.1), FORGET, RETAIN, show_progress=False)
    assert list(model.methods) == ["neuron_adjust"]
    with pytest.raises(ValueError, match=r"Cannot save the base model's files \(save_base_model=True\)"):
        model.save_pretrained(tmp_path / "full", save_base_model=True)
    assert not (tmp_path / "full").exists()
    assert model.weights_changed() == []  # q_proj.base_layer.weight is the base's q_proj.weight
    model.save_pretrained(tmp_path / "light")
    saved = json.loads((tmp_path / "light" / "unlearn_config.json").read_text())
    assert saved["layout"] == "light"
    assert [r[0] for r in saved["base_model"]["fingerprint"]["parameters"]] == names
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "light")
    torch.testing.assert_close(loaded(PROMPT).logits, adjusted, rtol=0, atol=0)
