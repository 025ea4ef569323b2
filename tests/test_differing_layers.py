"""Decoder layers that differ from block to block (Mllama's cross-attention layers among self-attention ones):
discovery refuses them with a message, and a callable override naming the FFLs of the layers that run on text works
with every method; naming a layer that a text-only forward skips fails loudly instead of fitting nothing."""

from __future__ import annotations

import pytest
import torch
from helpers_na import token_batches
from tiny_models import hook_count, small_text_kwargs
from transformers import AutoConfig, AutoModelForCausalLM

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
)
from unlearn_hf.sites import SiteError, find_ffl_sites

FORGET, RETAIN = dict(lo=3, hi=64), dict(lo=64, hi=128)


def tiny_mllama_text() -> torch.nn.Module:
    """Mllama's text decoder: self-attention layers 0 and 2, a cross-attention layer 1 (skipped without an image)."""
    text = small_text_kwargs(num_hidden_layers=3, cross_attention_layers=[1])
    config = AutoConfig.for_model("mllama", text_config=text)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()  # MllamaForCausalLM: the text decoder alone


def self_attention_ffls(model):
    return [
        (layer.mlp.gate_proj, layer.mlp.down_proj)
        for layer in model.model.layers
        if "CrossAttention" not in type(layer).__name__
    ]


def test_discovery_refuses_layers_that_differ_and_says_how_to_name_them():
    model = tiny_mllama_text()
    assert [type(b).__name__ for b in model.model.layers] == [
        "MllamaSelfAttentionDecoderLayer",
        "MllamaCrossAttentionDecoderLayer",
        "MllamaSelfAttentionDecoderLayer",
    ]
    with pytest.raises(SiteError, match=r"Cannot tell the decoder layers.*site override"):
        find_ffl_sites(model)


def test_a_callable_override_over_the_layers_that_run_gets_every_method():
    model = tiny_mllama_text()
    unlearned = UnlearnedModelForCausalLM.from_base(model, sites=self_attention_ffls)
    assert [s.pre_name for s in unlearned.ffl_sites] == [f"model.layers.{i}.mlp.gate_proj" for i in (0, 2)]
    forget, retain = token_batches(0, **FORGET, n=2), token_batches(1, **RETAIN, n=2)
    row = {k: v[:1] for k, v in forget[0].items()}
    with torch.no_grad():
        plain = model(**row, use_cache=False).logits
    for config in (NeuronAdjustConfig(ratio=0.1, deterministic=True), SelectivePruningConfig(ratio=0.1)):
        unlearned.fit(config, forget, retain, show_progress=False)
        with torch.no_grad():
            assert not torch.equal(unlearned(**row, use_cache=False).logits, plain)
            with unlearned.disable_unlearning():
                assert torch.equal(unlearned(**row, use_cache=False).logits, plain)
        unlearned.remove_all_methods()
    assert hook_count(model) == 0
    ksd = unlearned.fit(
        KeySpaceDetectionConfig(inputs="prompts", layers=[1], alpha=1.0, window=1, action="eos"),
        forget,
        show_progress=False,
    )
    assert ksd.config.layers == [1]  # the second named site: model layer 2
    assert bool(unlearned.detect(**row)[0])
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    out = unlearned.generate(**row, **kw, return_dict_in_generate=True)
    assert out.abstained.tolist() == [
        True
    ]  # the fitted row, inside at α = 1: the text-only generate abstains
    with unlearned.disable_unlearning():
        assert torch.equal(unlearned.generate(**row, **kw), model.generate(**row, **kw))


def test_naming_a_layer_that_text_only_forwards_skip_fails_loudly():
    model = tiny_mllama_text()
    every = lambda m: [(b.mlp.gate_proj, b.mlp.down_proj) for b in m.model.layers]  # noqa: E731
    unlearned = UnlearnedModelForCausalLM.from_base(model, sites=every)
    forget, retain = token_batches(0, **FORGET, n=3), token_batches(1, **RETAIN, n=3)
    forwards = []
    model.model.embed_tokens.register_forward_hook(lambda *a: forwards.append(1))
    for config in (NeuronAdjustConfig(ratio=0.1), SelectivePruningConfig(ratio=0.1)):
        forwards.clear()
        with pytest.raises(
            ValueError, match=r"sites of layers \[1\] \(model\.layers\.1\.mlp\.down_proj.*saw no tokens"
        ):
            unlearned.fit(config, forget, retain, show_progress=False, batch_size=1)
        assert len(forwards) == 1  # after the first batch, not at the end of the pass
        assert not unlearned.methods and hook_count(model) == 1  # the test's own counting hook
