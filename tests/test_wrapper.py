"""UnlearnedModelForCausalLM with nothing fitted is the base model; hooks are owned; drop-in compatibility."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from tiny_models import tiny_llama
from transformers import LlamaForCausalLM, PreTrainedModel, TextStreamer, pipeline

from unlearn_hf import NeuronAdjustConfig, SelectivePruningConfig, UnlearnedModelForCausalLM
from unlearn_hf.methods import SelectivePruning


def token_batches(seed: int, n: int = 3, length: int = 12, vocab: int = 49152):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (4, length), generator=g)} for _ in range(n)]


def left_padded(tokenizer, texts):
    tokenizer.padding_side = "left"
    try:
        return tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"


PROMPTS = ["Question: What is 2 + 3?\nAnswer:", "Write a haiku", "def fib(n):"]


@pytest.fixture
def pair():
    model = tiny_llama()
    return model, UnlearnedModelForCausalLM.from_base(model)


def test_base_model_keeps_its_transformers_meaning_for_libraries_and_warns_users(pair):
    model, unlearned = pair
    # user code: the old meaning (the plain model) for one more release, with a FutureWarning
    with pytest.warns(FutureWarning, match="get_base_model"):
        assert unlearned.base_model is model
    # transformers' own code reads its meaning: the backbone
    assert PreTrainedModel.get_decoder(unlearned) is model.model
    ns = {"__name__": "transformers.modeling_utils", "m": unlearned}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert eval("m.base_model", ns) is model.model


def test_types_and_base_model(pair):
    model, unlearned = pair
    assert isinstance(unlearned, UnlearnedModelForCausalLM)
    assert isinstance(unlearned, LlamaForCausalLM) and isinstance(unlearned, PreTrainedModel)
    assert type(unlearned).__name__ == "LlamaForCausalLM"  # what pipelines check
    assert unlearned.get_base_model() is model
    assert type(model) is LlamaForCausalLM  # the base object is left as it was
    assert unlearned.config is model.config
    assert unlearned.model.layers[0].mlp.gate_proj is model.model.layers[0].mlp.gate_proj
    assert unlearned.get_decoder() is model.get_decoder()


def test_bad_base_models(pair):
    _, unlearned = pair
    with pytest.raises(TypeError, match="already an UnlearnedModelForCausalLM"):
        UnlearnedModelForCausalLM.from_base(unlearned)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        UnlearnedModelForCausalLM.from_base(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_logits_and_generation_without_methods(smol_tokenizer, dtype):
    model = tiny_llama().to(dtype)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    enc = left_padded(smol_tokenizer, PROMPTS)
    with torch.no_grad():
        assert torch.equal(unlearned(**enc).logits, model(**enc).logits)
    kw = dict(max_new_tokens=8, pad_token_id=smol_tokenizer.pad_token_id)
    assert torch.equal(
        unlearned.generate(**enc, do_sample=False, **kw), model.generate(**enc, do_sample=False, **kw)
    )
    torch.manual_seed(7)
    a = unlearned.generate(**enc, do_sample=True, top_k=50, **kw)
    torch.manual_seed(7)
    b = model.generate(**enc, do_sample=True, top_k=50, **kw)
    assert torch.equal(a, b)
    beam = dict(num_beams=3, num_return_sequences=2, do_sample=False, **kw)
    assert torch.equal(unlearned.generate(**enc, **beam), model.generate(**enc, **beam))


def test_pipeline_and_streamer_without_warnings(pair, smol_tokenizer, caplog, capsys):
    from transformers.utils import logging as hf_logging

    model, unlearned = pair
    hf_logging.enable_propagation()  # let caplog see transformers' own warnings and errors
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        pipe = pipeline("text-generation", model=unlearned, tokenizer=smol_tokenizer)
        out = pipe(PROMPTS[0], max_new_tokens=6, do_sample=False)
        plain = pipeline("text-generation", model=model, tokenizer=smol_tokenizer)(
            PROMPTS[0], max_new_tokens=6, do_sample=False
        )
    hf_logging.disable_propagation()
    assert not [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert out[0]["generated_text"] == plain[0]["generated_text"]
    enc = smol_tokenizer(PROMPTS[0], return_tensors="pt")
    streamed = unlearned.generate(
        **enc, max_new_tokens=6, do_sample=False, streamer=TextStreamer(smol_tokenizer)
    )
    text = capsys.readouterr().out
    assert smol_tokenizer.decode(streamed[0, enc["input_ids"].shape[1] :]).strip() in text


def test_device_map_loaded_model(tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"": "cpu"}).eval()
    unlearned = UnlearnedModelForCausalLM.from_base(mapped)
    enc = left_padded(smol_tokenizer, PROMPTS)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=smol_tokenizer.pad_token_id)
    assert torch.equal(unlearned.generate(**enc, **kw), plain.generate(**enc, **kw))
    unlearned.fit(SelectivePruningConfig(ratio=0.1), token_batches(0), token_batches(1), show_progress=False)
    with torch.no_grad():
        assert not torch.equal(unlearned(**enc).logits, plain(**enc).logits)
        with unlearned.disable_unlearning():
            assert torch.equal(unlearned(**enc).logits, plain(**enc).logits)


def hook_counts(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def test_hooks_are_owned_and_removal_restores_the_base(pair, smol_tokenizer):
    model, unlearned = pair
    enc = left_padded(smol_tokenizer, PROMPTS)
    with torch.no_grad():
        reference = model(**enc).logits.clone()
    foreign_calls = []
    gate = model.model.layers[1].mlp.gate_proj
    foreign = gate.register_forward_hook(lambda m, a, o: foreign_calls.append(1))
    before = hook_counts(model)
    unlearned.fit(SelectivePruningConfig(ratio=0.2), token_batches(0), token_batches(1), show_progress=False)
    unlearned.fit(
        NeuronAdjustConfig(ratio=0.2, deterministic=True),
        token_batches(2),
        token_batches(3),
        show_progress=False,
    )
    assert hook_counts(model) != before
    with torch.no_grad():
        changed = unlearned(**enc).logits
        assert not torch.equal(changed, reference)
        # the base object stays the plain model while the wrapper has methods attached
        assert torch.equal(model(**enc).logits, reference)
        assert torch.equal(unlearned.get_base_model()(**enc).logits, reference)
        with unlearned.disable_unlearning():
            assert torch.equal(unlearned(**enc).logits, reference)
        with unlearned.disable_unlearning("neuron_adjust"):
            only_sp = unlearned(**enc).logits
        assert not torch.equal(only_sp, reference) and not torch.equal(only_sp, changed)
        assert torch.equal(unlearned(**enc).logits, changed)  # the context ended
    unlearned.remove_method("selective_pruning")
    with torch.no_grad():
        only_na = unlearned(**enc).logits
    assert not torch.equal(only_na, reference)
    n_calls = len(foreign_calls)
    assert unlearned.unload() is model
    assert hook_counts(model) == before  # our hooks are gone, the foreign one is still there
    with torch.no_grad():
        assert torch.equal(unlearned(**enc).logits, reference)
    assert len(foreign_calls) > n_calls
    foreign.remove()
    with pytest.raises(KeyError, match="No method named"):
        unlearned.remove_method("neuron_adjust")


def test_a_dropped_wrapper_is_freed_and_its_hooks_leave_the_base(smol_tokenizer):
    """A wrapper per grid point, dropped without remove_method: the base model's modules held its hooks, the hooks
    held the wrapper, so none was ever freed and every forward of the base ran every dead wrapper's gates (a
    review). A wrapper still in use keeps its hooks through a garbage collection."""
    import gc
    import weakref

    model = tiny_llama()
    enc = left_padded(smol_tokenizer, PROMPTS)
    before = hook_counts(model)
    with torch.no_grad():
        reference = model(**enc).logits.clone()
    kept = UnlearnedModelForCausalLM.from_base(model)
    kept.fit(SelectivePruningConfig(ratio=0.2), token_batches(0), token_batches(1), show_progress=False)
    with torch.no_grad():
        kept_logits = kept(**enc).logits.clone()
    with_kept = hook_counts(model)
    refs = []
    for ratio in (0.1, 0.3):
        u = UnlearnedModelForCausalLM.from_base(model)
        u.fit(SelectivePruningConfig(ratio=ratio), token_batches(0), token_batches(1), show_progress=False)
        u.fit(NeuronAdjustConfig(ratio=ratio), token_batches(2), token_batches(3), show_progress=False)
        refs.append(weakref.ref(u))
        del u
    gc.collect()
    assert all(r() is None for r in refs)
    assert hook_counts(model) == with_kept != before
    with torch.no_grad():
        assert torch.equal(kept(**enc).logits, kept_logits)
        assert torch.equal(model(**enc).logits, reference)
    del kept
    gc.collect()
    assert hook_counts(model) == before


def test_replacing_a_shared_member_through_the_wrapper_replaces_it_in_the_base(tmp_path, smol_tokenizer):
    """``resize_token_embeddings`` on the wrapper set a new ``lm_head`` on the wrapper only: the base kept the old
    head with the new vocabulary size in its config, and a full save wrote the stale head (it then failed to load;
    a review). The training flag is shared too."""
    model = tiny_llama(vocab_size=128)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    unlearned.fit(SelectivePruningConfig(ratio=0.2), token_batches(0, vocab=128), token_batches(1, vocab=128))
    unlearned.resize_token_embeddings(160, mean_resizing=False)
    assert model.lm_head is unlearned.lm_head and model.lm_head.weight.shape[0] == 160
    assert model.get_input_embeddings() is unlearned.get_input_embeddings()
    ids = torch.tensor([[5, 150, 7, 159]])
    unlearned.save_pretrained(tmp_path / "full", save_base_model=True)
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "full")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, unlearned(ids).logits)
    model.train()
    assert unlearned.training and unlearned.model.training
    unlearned.eval()
    assert not model.training


def test_failed_attach_leaves_no_hooks(pair):
    model, unlearned = pair
    before = hook_counts(model)
    method = SelectivePruning.fit(
        unlearned,
        SelectivePruningConfig(ratio=0.5),
        token_batches(0),
        token_batches(1),
        spec=__import__("unlearn_hf").DataSpec(),
        show_progress=False,
    )
    method.state["neuron_index"][-1] = 10_000  # out of range for d_ff = 64, found only when attaching
    with pytest.raises(ValueError, match="neuron ind"):
        unlearned.add_method("bad", method)
    assert hook_counts(model) == before
    assert "bad" not in unlearned.methods


def test_user_subclass_overrides_a_method_piece(pair, smol_tokenizer):
    model, _ = pair

    class ZeroEverything(SelectivePruning):
        """A user variant: prune every selected neuron *and* report how often it ran."""

        calls = 0

        def attach(self, model, hooks):
            attachment = super().attach(model, hooks)
            for site in model.ffl_sites:
                hooks.forward_pre_hook(site.key, self._count)
            return attachment

        def _count(self, ctx, key):
            type(self).calls += 1

    class MyUnlearned(UnlearnedModelForCausalLM):
        method_classes = {**UnlearnedModelForCausalLM.method_classes, "selective_pruning": ZeroEverything}

    mine = MyUnlearned.from_base(model)
    assert isinstance(mine, MyUnlearned) and isinstance(mine, LlamaForCausalLM)
    method = mine.fit(
        SelectivePruningConfig(ratio=0.1), token_batches(0), token_batches(1), show_progress=False
    )
    assert isinstance(method, ZeroEverything)
    with torch.no_grad():
        mine(**smol_tokenizer(PROMPTS[:1], return_tensors="pt"))
    assert ZeroEverything.calls == len(mine.ffl_sites)


def test_module_tree_is_the_base_models(pair):
    model, unlearned = pair
    unlearned.eval()
    unlearned.train(False)
    assert [n for n, _ in unlearned.named_modules()] == [n for n, _ in model.named_modules()]
    assert list(unlearned.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(unlearned.parameters(), model.parameters()))
    unlearned.extra_head = torch.nn.Linear(2, 2)  # a top-level attribute of the wrapper only
    assert not hasattr(model, "extra_head")


def test_nested_disable_blocks_of_two_models_each_keep_theirs(smol_tokenizer):
    """Inside ``a.disable_unlearning()`` and then ``b.disable_unlearning()``, both are their plain base models;
    leaving b's block switches b back on only (the inner block used to switch a's methods back on: a review)."""
    enc = left_padded(smol_tokenizer, PROMPTS)
    models = []
    for seed in (0, 1):
        base = tiny_llama(seed=seed)
        unlearned = UnlearnedModelForCausalLM.from_base(base)
        unlearned.fit(
            SelectivePruningConfig(ratio=0.2), token_batches(0), token_batches(1), show_progress=False
        )
        models.append((unlearned, base))
    (a, a_base), (b, b_base) = models
    with torch.no_grad():
        plain = {"a": a_base(**enc).logits, "b": b_base(**enc).logits}
        changed = {"a": a(**enc).logits, "b": b(**enc).logits}
        assert not torch.equal(changed["a"], plain["a"]) and not torch.equal(changed["b"], plain["b"])
        with a.disable_unlearning():
            with b.disable_unlearning("selective_pruning"):
                assert torch.equal(a(**enc).logits, plain["a"])
                assert torch.equal(b(**enc).logits, plain["b"])
            assert torch.equal(a(**enc).logits, plain["a"])
            assert torch.equal(b(**enc).logits, changed["b"])
        assert torch.equal(a(**enc).logits, changed["a"])


def test_sites_are_found_again_after_a_module_was_replaced():
    """Replacing an FFL module after fitting (surgery, a wrapper of one's own) makes the next forward raise; refitting
    then hooks the new modules, as on a freshly wrapped model (the sites were cached: the refit probed the old
    modules and failed on a wrong diagnosis, found by a review)."""
    from tiny_models import random_batches

    forget, retain = random_batches(1, 500), random_batches(2, 500)
    config = SelectivePruningConfig(ratio=0.1)
    unlearned = UnlearnedModelForCausalLM.from_base(tiny_llama(vocab_size=500))
    unlearned.fit(config, forget, retain, show_progress=False)
    mlp = unlearned.get_base_model().model.layers[0].mlp
    new = type(mlp)(unlearned.config)
    new.load_state_dict(mlp.state_dict())
    unlearned.get_base_model().model.layers[0].mlp = new  # same weights, new modules (without the hooks)
    with pytest.raises(RuntimeError, match="Unlearning did not run"):
        unlearned(forget[0]["input_ids"])
    unlearned.remove_all_methods()
    unlearned.fit(config, forget, retain, show_progress=False)
    assert unlearned.ffl_sites[0].key is unlearned.get_base_model().model.layers[0].mlp.down_proj
    fresh = UnlearnedModelForCausalLM.from_base(tiny_llama(vocab_size=500))
    fresh.fit(config, forget, retain, show_progress=False)
    torch.testing.assert_close(unlearned(forget[0]["input_ids"]).logits, fresh(forget[0]["input_ids"]).logits)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
def test_dynamically_quantized_models_are_refused_with_the_way_round(tmp_path):
    """torch.ao's quantized linears keep packed weights and no parameters: the refusal says so and what works
    (quantizing the unlearned model afterwards, whose hooks carry over; checked below)."""
    from tiny_models import random_batches

    from unlearn_hf.sites import SiteError

    forget, retain = random_batches(1, 500), random_batches(2, 500)
    quantize = torch.ao.quantization.quantize_dynamic
    model = quantize(tiny_llama(vocab_size=500), {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(
        SiteError, match=r"quantized module with packed weights.*then quantize the unlearned model"
    ):
        UnlearnedModelForCausalLM.from_base(model).fit(
            SelectivePruningConfig(ratio=0.1), forget, retain, show_progress=False
        )
    unlearned = UnlearnedModelForCausalLM.from_base(tiny_llama(vocab_size=500))
    unlearned.fit(SelectivePruningConfig(ratio=0.3), forget, retain, show_progress=False)
    quantized = quantize(unlearned, {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"Cannot save: 15 modules are quantized with packed weights"):
        quantized.save_pretrained(tmp_path / "q", base_model_name_or_path="org/base")
    assert not (tmp_path / "q").exists()
    ids = forget[0]["input_ids"]
    with torch.no_grad(), quantized.disable_unlearning():
        plain = quantized(ids).logits
    with torch.no_grad():
        assert not torch.equal(quantized(ids).logits, plain)
