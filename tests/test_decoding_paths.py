"""Abstention that no decoding path bypasses, and the paths that cannot carry the methods failing loudly.

For every ``generate`` mode of transformers 5 (greedy, sampling, beams, static cache, streamers, assisted decoding
with an assistant model, prompt lookup, early exit, an assistant with another tokenizer): the forget row abstains
(its generated tokens are the refusal) and the retain row is bit-identical to the plain base model's output of
the same mode. Modes that run decoding code unlearn_hf cannot check are refused. ``torch.compile`` / ``model.compile()``
keep the methods, ``copy.deepcopy`` makes an unlearned model of its own, pickling is refused, activation
checkpointing recomputes with the methods, and a forward that bypasses the hooks raises.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import pickle

import pytest
import torch
from helpers_ksd import FORGET, N_LAYERS, OTHER, encode
from test_ksd_generation import REFUSAL, check_rows, expected_abstaining_row
from tiny_models import tiny_llama, tiny_model, tiny_tokenizer
from transformers import TextStreamer

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
)
from unlearn_hf.methods.neuron_adjust import layer as layer_module
from unlearn_hf.methods.neuron_adjust import sampling

#: A forget query repeated: prompt lookup finds its tail earlier in the prompt and proposes candidate tokens, so the
#: first forward of assisted decoding carries the prompt plus candidates.
FORGET_PROMPT = f"{FORGET[0]} 51\n{FORGET[0]}"
#: Not a forget query (it stops before "\nAnswer:"), but prompt lookup proposes "\nAnswer:" after it: a decision
#: read at the end of the first forward rather than at the prompt's end would abstain.
RETAIN_PROMPT = "Question: What is 1 plus 50?\nAnswer: no.\nQuestion: What is 1 plus 50?"
ROWS = [FORGET_PROMPT, RETAIN_PROMPT]
IS_FORGET = [True, False]
NEW = 10


@pytest.fixture(scope="module", autouse=True)
def _one_thread_here(one_thread):
    """Tiny models run fastest on one thread (several spin against each other on a shared machine)."""


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    return copy.deepcopy(smol_tokenizer)


def random_batches(seed: int, lo: int, hi: int, n: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(lo, hi, (4, 12), generator=g)} for _ in range(n)]


def fit_ksd(unlearned, tok, **overrides):
    config = KeySpaceDetectionConfig(layers=[1], alpha=1.5, refusal=REFUSAL, **overrides)
    return unlearned.fit(config, forget=FORGET, tokenizer=tok, show_progress=False)


@pytest.fixture(scope="module")
def setup(tok):
    """A tiny Llama with Key Space Detection fitted so that forget queries are separable (shared: do not change)."""
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    fit_ksd(unlearned, tok)
    return model, unlearned


@pytest.fixture(scope="module")
def assistant():
    """A second tiny model with the same vocabulary."""
    return tiny_llama(layers=2, seed=3)


def test_the_rows_exercise_the_prompt_end(setup, tok):
    _, unlearned = setup
    batch = encode(tok, ROWS, "left")
    assert unlearned.detect(**batch).tolist() == IS_FORGET
    lookahead = encode(tok, [RETAIN_PROMPT + "\nAnswer:"])
    assert unlearned.detect(**lookahead).item()  # what the prompt plus the candidates would decide


def grown(sequences: torch.Tensor, n: int, width: int, pad: int) -> torch.Tensor:
    new = sequences[:, n:]
    return torch.nn.functional.pad(new, (0, width - new.shape[1]), value=pad)


BATCHED = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, temperature=1.3, top_k=100),
    "sampling_num_return_sequences": dict(do_sample=True, top_k=50, num_return_sequences=2),
    "beam_search": dict(num_beams=3, do_sample=False, num_return_sequences=2),
    "beam_sample": dict(num_beams=2, do_sample=True, top_k=50),
    "static_cache": dict(do_sample=False, cache_implementation="static"),
    "static_cache_sampling": dict(do_sample=True, top_k=50, cache_implementation="static"),
}


@pytest.mark.parametrize("mode", list(BATCHED))
def test_batched_modes(setup, tok, mode):
    model, unlearned = setup
    kw = dict(BATCHED[mode], max_new_tokens=NEW)
    batch = encode(tok, ROWS, "left")
    n = batch["input_ids"].shape[1]
    torch.manual_seed(7)
    out = unlearned.generate(**batch, **kw, return_dict_in_generate=True)
    torch.manual_seed(7)
    base = model.generate(**batch, **kw)
    per_input = kw.get("num_return_sequences", 1)
    expanded = [f for f in IS_FORGET for _ in range(per_input)]
    assert out.abstained.tolist() == expanded
    width = max(out.sequences.shape[1], base.shape[1]) - n
    pad = model.generation_config.pad_token_id
    check_rows(tok, model, grown(out.sequences, n, width, pad), grown(base, n, width, pad), expanded)


ONE_ROW = {
    "assistant_greedy": dict(do_sample=False),
    "assistant_sampling": dict(do_sample=True, top_k=50),
    "prompt_lookup_greedy": dict(do_sample=False, prompt_lookup_num_tokens=3),
    "prompt_lookup_sampling": dict(do_sample=True, top_k=50, prompt_lookup_num_tokens=3),
    "early_exit": dict(do_sample=False, assistant_early_exit=1),
}


def generate_rows(unlearned, model, tok, kw, seed=7):
    """Each row alone (assisted decoding takes one row at a time): ``(new tokens, base's new tokens, abstained)``."""
    for text, forget in zip(ROWS, IS_FORGET):
        enc = encode(tok, [text])
        n = enc["input_ids"].shape[1]
        torch.manual_seed(seed)
        out = unlearned.generate(**enc, **kw, return_dict_in_generate=True)
        torch.manual_seed(seed)
        base = model.generate(**enc, **kw)
        yield forget, out.sequences[:, n:], base[:, n:], out.abstained.tolist()


@pytest.mark.parametrize("mode", list(ONE_ROW))
def test_assisted_decoding_one_row_at_a_time(setup, tok, assistant, mode):
    model, unlearned = setup
    kw = dict(ONE_ROW[mode], max_new_tokens=NEW)
    if mode.startswith("assistant"):
        kw["assistant_model"] = assistant
    for forget, new, base, abstained in generate_rows(unlearned, model, tok, kw):
        assert abstained == [forget]
        if forget:  # the refusal token for token, however many candidates each forward verified
            assert new[0].tolist() == expected_abstaining_row(tok, model, new.shape[1])
            assert new.shape[1] == len(tok(REFUSAL, add_special_tokens=False)["input_ids"]) + 1
        else:
            assert torch.equal(new, base)


def test_assistant_with_another_tokenizer(setup, tok):
    """Universal assisted decoding: the assistant drafts in its own vocabulary; the abstention processors force
    this model's token ids and stay out of the assistant's generate."""
    model, unlearned = setup
    kw = dict(
        do_sample=False,
        max_new_tokens=NEW,
        assistant_model=tiny_model("llama"),
        tokenizer=tok,
        assistant_tokenizer=tiny_tokenizer(),
    )
    for forget, new, base, abstained in generate_rows(unlearned, model, tok, kw):
        assert abstained == [forget]
        if forget:
            assert new[0].tolist() == expected_abstaining_row(tok, model, new.shape[1])
        else:
            assert torch.equal(new, base)


@pytest.mark.parametrize("assisted", [False, True])
def test_text_streamer(setup, tok, assistant, capsys, assisted):
    model, unlearned = setup
    kw = dict(do_sample=False, max_new_tokens=NEW)
    if assisted:
        kw["assistant_model"] = assistant
    for text, forget in zip(ROWS, IS_FORGET):
        enc = encode(tok, [text])
        capsys.readouterr()
        unlearned.generate(
            **enc, **kw, streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        )
        got = capsys.readouterr().out
        if forget:
            assert got.strip() == REFUSAL
        else:
            model.generate(
                **enc, **kw, streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
            )
            assert got == capsys.readouterr().out


REFUSED = {
    "contrastive_search": dict(penalty_alpha=0.6, top_k=4),
    "dola": dict(dola_layers="low"),
    "dola_trusting_remote_code": dict(dola_layers="low", trust_remote_code=True),
    "group_beam_search": dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
    "custom_generate": dict(custom_generate=lambda model, **kwargs: None),
}


@pytest.mark.parametrize("mode", list(REFUSED))
def test_modes_that_run_unchecked_decoding_code_are_refused(setup, tok, mode):
    _, unlearned = setup
    enc = encode(tok, [FORGET[1]])
    with pytest.raises(ValueError, match="cannot check"):
        unlearned.generate(**enc, max_new_tokens=3, **REFUSED[mode])


def test_continuous_batching_is_refused(setup, tok):
    _, unlearned = setup
    enc = encode(tok, [FORGET[1]])
    with pytest.raises(ValueError, match="Continuous batching"):
        unlearned.generate(**enc, max_new_tokens=3, cache_implementation="paged")
    with pytest.raises(ValueError, match="Continuous batching"):
        unlearned.generate_batch([enc["input_ids"][0].tolist()])


def test_recheck_each_token_refuses_assisted_decoding(setup, tok, assistant):
    _, unlearned = setup
    method = unlearned.methods["key_space_detection"]
    recheck = type(method)(dataclasses.replace(method.config, recheck_each_token=True), method.state)
    other = UnlearnedModelForCausalLM.from_base(unlearned.get_base_model())
    other.add_method("ksd", recheck)
    enc = encode(tok, [OTHER[1]])
    try:
        with pytest.raises(ValueError, match="recheck_each_token"):
            other.generate(**enc, max_new_tokens=3, assistant_model=assistant)
        with pytest.raises(ValueError, match="recheck_each_token"):
            other.generate(**enc, max_new_tokens=3, prompt_lookup_num_tokens=2)
        other.generate(**enc, max_new_tokens=3)  # other modes recheck as before
    finally:
        other.remove_all_methods()  # the base model is shared with the other tests


@pytest.mark.parametrize("mode", ["prompt_lookup", "contrastive_search"])
def test_a_mode_set_in_the_models_generation_config_is_seen_with_a_config_given_to_generate(setup, tok, mode):
    """generate fills what a GenerationConfig given to the call leaves unset from the model's own (a saved
    generation_config.json): the mode check must judge that merged config, or the saved mode runs unchecked."""
    from transformers import GenerationConfig

    _, unlearned = setup
    method = unlearned.methods["key_space_detection"]
    recheck = type(method)(dataclasses.replace(method.config, recheck_each_token=True), method.state)
    other = UnlearnedModelForCausalLM.from_base(unlearned.get_base_model())
    other.add_method("ksd", recheck)
    saved = copy.deepcopy(other.generation_config)
    setting, error = {
        "prompt_lookup": (dict(prompt_lookup_num_tokens=2), "recheck_each_token"),
        "contrastive_search": (dict(penalty_alpha=0.6, top_k=4), "cannot check"),
    }[mode]
    enc = encode(tok, [FORGET_PROMPT])
    try:
        for key, value in setting.items():
            setattr(other.generation_config, key, value)
        with pytest.raises(ValueError, match=error):
            other.generate(**enc, generation_config=GenerationConfig(max_new_tokens=3, do_sample=False))
        with pytest.raises(ValueError, match=error):
            other.generate(**enc, max_new_tokens=3)
    finally:
        other.generation_config = saved
        other.remove_all_methods()  # the base model is shared with the other tests


@pytest.fixture(scope="module")
def na_sp():
    """A tiny Llama with (deterministic) Neuron Adjust and Selective Pruning, which apply token by token."""
    model = tiny_llama()
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    forget, retain = random_batches(0, 3, 400), random_batches(1, 30000, 49000)
    unlearned.fit(NeuronAdjustConfig(ratio=0.2, deterministic=True), forget, retain, show_progress=False)
    unlearned.fit(SelectivePruningConfig(ratio=0.1), forget, retain, show_progress=False)
    return model, unlearned


@pytest.mark.parametrize("mode", ["assistant", "prompt_lookup", "static_cache", "early_exit"])
def test_neuron_adjust_and_pruning_apply_per_token_in_every_mode(na_sp, assistant, mode):
    """Assisted decoding and a static cache produce what plain greedy search produces, with the methods applied
    (and something else than the base model)."""
    model, unlearned = na_sp
    prompt = torch.randint(3, 400, (1, 9), generator=torch.Generator().manual_seed(5))
    prompt = torch.cat([prompt, prompt[:, :4]], 1)  # a repeated n-gram for prompt lookup
    extra = {
        "assistant": dict(assistant_model=assistant),
        "prompt_lookup": dict(prompt_lookup_num_tokens=3),
        "static_cache": dict(cache_implementation="static"),
        "early_exit": dict(assistant_early_exit=1),
    }[mode]
    kw = dict(do_sample=False, max_new_tokens=12)
    greedy = unlearned.generate(prompt, **kw)
    assert torch.equal(unlearned.generate(prompt, **kw, **extra), greedy)
    assert torch.equal(model.generate(prompt, **kw, **extra), model.generate(prompt, **kw))
    assert not torch.equal(model.generate(prompt, **kw), greedy)


# -- paths that cannot carry the methods unless made to -------------------------------------------------------
def test_compiled_model_keeps_the_methods(tok):
    """``torch.compile(model)`` and ``model.compile()``: the hooks run as plain Python between compiled graphs, also
    when the methods hook some decoder layers and not others (which share their compiled code)."""
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    fit_ksd(unlearned, tok)
    forget, retain = random_batches(0, 3, 400), random_batches(1, 30000, 49000)
    na = NeuronAdjustConfig(ratio=0.2, deterministic=True, layers=[0, 3])
    unlearned.fit(na, forget, retain, show_progress=False)
    batch = encode(tok, ROWS, "left")
    with torch.no_grad():
        eager = unlearned(**batch).logits
        plain = model(**batch).logits
        compiled = torch.compile(unlearned, backend="eager")(**batch).logits
    assert torch.equal(compiled, eager) and not torch.equal(compiled[1], plain[1])
    assert torch.isfinite(compiled[0, -1]).sum() == 1  # the forget row carries only the refusal
    with pytest.raises(ValueError, match="fullgraph"):
        unlearned.compile(fullgraph=True)
    unlearned.compile(backend="eager")
    with torch.no_grad():
        assert torch.equal(unlearned(**batch).logits, eager)


def swap_for_hookless_copy(model, module) -> None:
    name = next(n for n, m in model.named_modules() if m is module)
    clean = copy.deepcopy(module)
    clean._forward_pre_hooks.clear()
    clean._forward_hooks.clear()
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, clean)


def test_forward_that_bypasses_hooks_raises(tok):
    """Modules swapped for hook-less copies after attaching: the forward raises instead of silently running
    without (all of) the methods."""
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    fit_ksd(unlearned, tok)
    forget, retain = random_batches(0, 3, 400), random_batches(1, 30000, 49000)
    unlearned.fit(NeuronAdjustConfig(ratio=0.2, deterministic=True), forget, retain, show_progress=False)
    enc = encode(tok, [OTHER[0]])
    unlearned(**enc)
    swap_for_hookless_copy(model, unlearned.ffl_sites[2].pre)  # one of Neuron Adjust's four layers
    with pytest.raises(RuntimeError, match=r"Unlearning did not run.*neuron_adjust \(1 of 4\)"):
        unlearned(**enc)
    swap_for_hookless_copy(model, unlearned.ffl_sites[1].key)  # where Key Space Detection decides
    with pytest.raises(RuntimeError, match=r"key_space_detection \(1 of 1\)"):
        unlearned.generate(**enc, max_new_tokens=2)


def test_deepcopy_is_an_unlearned_model_of_its_own(setup, tok):
    model = tiny_llama(layers=N_LAYERS)
    original = UnlearnedModelForCausalLM.from_base(model)
    original.add_method("ksd", setup[1].methods["key_space_detection"])
    forget, retain = random_batches(0, 3, 400), random_batches(1, 30000, 49000)
    na = NeuronAdjustConfig(ratio=0.2, deterministic=True, layers=[3])  # after the layer KSD reads
    original.fit(na, forget, retain, name="na", show_progress=False)
    copied = copy.deepcopy(original)
    assert type(copied) is type(original) and copied.get_base_model() is not model
    assert copied.methods == original.methods  # fitted methods are immutable: shared
    assert all(
        p.data_ptr() != q.data_ptr() for p, q in zip(copied.parameters(), original.parameters(), strict=True)
    )
    copied_ids = {h.id for a in copied.attachments.values() for h in a.hooks.handles}
    original_ids = {h.id for a in original.attachments.values() for h in a.hooks.handles}
    on_copy = {i for m in copied.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for i in d}
    assert copied_ids <= on_copy and not original_ids & on_copy  # its own hooks on its own modules only
    batch = encode(tok, ROWS, "left")
    with torch.no_grad():
        want, got, plain = original(**batch).logits, copied(**batch).logits, model(**batch).logits
    assert torch.equal(got, want) and not torch.equal(got[1], plain[1])  # NA differs from the base alike
    original.remove_all_methods()  # the copy keeps its own
    n = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=NEW, do_sample=False)
    out = copied.generate(**batch, **kw, return_dict_in_generate=True)
    assert out.abstained.tolist() == IS_FORGET
    with copied.disable_abstention():
        answered = copied.generate(**batch, **kw)
    width = max(out.sequences.shape[1], answered.shape[1]) - n
    pad = model.generation_config.pad_token_id
    check_rows(tok, model, grown(out.sequences, n, width, pad), grown(answered, n, width, pad), IS_FORGET)
    with torch.no_grad():
        assert torch.equal(original(**batch).logits, plain)


def test_shallow_copy_is_another_unlearned_model_over_the_same_base(setup, tok):
    model, unlearned = setup
    other = copy.copy(unlearned)
    assert other.get_base_model() is model and other.model is unlearned.model
    batch = encode(tok, ROWS, "left")
    assert other.detect(**batch).tolist() == IS_FORGET
    other.remove_all_methods()
    assert unlearned.detect(**batch).tolist() == IS_FORGET


def test_pickling_is_refused_with_a_pointer_to_save_pretrained(setup):
    _, unlearned = setup
    with pytest.raises(TypeError, match="save_pretrained"):
        pickle.dumps(unlearned)
    with pytest.raises(TypeError, match="save_pretrained"):
        torch.save(unlearned, io.BytesIO())


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_backward_recomputes_in_the_forwards_context_variables(reentrant):
    """A forward inside NeuronAdjust.deterministic() and its backward after the block: the recomputation read the
    block's switch at backward time and drew at random, so the gradients were not the forward's (a review). They
    equal those of the same state fitted deterministic=True, without checkpointing."""
    from unlearn_hf import NeuronAdjust

    forget, retain = random_batches(0, 3, 400), random_batches(1, 30000, 49000)
    ids = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(0))

    def grads(deterministic_config: bool, checkpointing: bool):
        model = tiny_llama(layers=N_LAYERS)
        unlearned = UnlearnedModelForCausalLM.from_base(model)
        config = NeuronAdjustConfig(ratio=0.2, deterministic=deterministic_config)
        method = unlearned.fit(config, forget, retain, show_progress=False)
        unlearned.train()
        if checkpointing:
            unlearned.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant}
            )
        block = contextlib.nullcontext() if deterministic_config else method.deterministic()
        with block:
            loss = unlearned(input_ids=ids, labels=ids).loss
        loss.backward()  # after the block
        assert isinstance(method, NeuronAdjust)
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, got = grads(False, True)
    want_loss, want = grads(True, False)
    assert torch.equal(loss, want_loss) and len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("draw", ["block", "per_layer"])
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("on", ["wrapper", "base"])
def test_gradient_checkpointing_recomputes_with_the_methods(tok, reentrant, draw, on, monkeypatch):
    """Loss and gradients with activation checkpointing are those without; (stochastic) Neuron Adjust draws the
    same thresholds again in the recomputation, whether the forward draws one block or layer by layer (a large
    forward: the generator state of each layer's draw is replayed), Key Space Detection decides once. Training
    mode and checkpointing may be switched on through the base model object (``get_base_model().train()``): the
    wrapper's own flag stayed False and the recomputation ran without the methods (a review)."""
    monkeypatch.setattr(sampling, "GROUP_DRAW_MAX_NUMEL", 0 if draw == "per_layer" else 10**9)
    if draw == "per_layer":  # the full-width path always draws one block
        monkeypatch.setattr(layer_module, "FULL_WIDTH_MAX_NUMEL", 0)

    def loss_and_grads(checkpointing: bool):
        model = tiny_llama(layers=N_LAYERS)
        unlearned = UnlearnedModelForCausalLM.from_base(model)
        forget, retain = random_batches(0, 3, 400), random_batches(1, 30000, 49000)
        unlearned.fit(NeuronAdjustConfig(ratio=0.2), forget, retain, show_progress=False)
        fit_ksd(unlearned, tok)
        target = unlearned if on == "wrapper" else model
        target.train()
        if checkpointing:
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        batch = encode(tok, [OTHER[0], OTHER[3]], "right")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = unlearned(**batch, labels=labels).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = loss_and_grads(True)
    want_loss, want_grads = loss_and_grads(False)
    assert torch.equal(loss, want_loss)
    assert len(grads) == len(want_grads)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
