"""Key Space Detection: the fit against a brute-force computation, per-row decisions against a numpy reference,
forward (scoring) semantics and bad input.

Tiny random models are made meaningful by construction: the forget queries share their ending (``Answer:``), the
other prompts end differently, so their key vectors at the last real token fall apart.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from helpers_ksd import FORGET, N_LAYERS, OTHER, KeyCapture, batches_of, encode, numpy_reference
from tiny_models import tiny_llama

from unlearn_hf import KeySpaceDetection, KeySpaceDetectionConfig, UnlearnedModelForCausalLM
from unlearn_hf.methods.key_space_detection.hypercube import KeySpaceLayer


@pytest.fixture
def tok(smol_tokenizer):
    """A private copy of the SmolLM2 tokenizer (tests change its padding side)."""
    return copy.deepcopy(smol_tokenizer)


def hook_counts(model):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def test_fit_matches_brute_force_on_the_fitted_vectors(tok):
    """k, μ and σ equal a numpy computation on the very vectors the fit saw; k is the smallest radius that holds
    them all: at α = 1 every fitted vector is inside, just below it one is outside."""
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    layers = [1, 3]
    batches = batches_of(tok, FORGET)  # right padding, several batches: streaming and merging are exercised
    # our hooks run before the probe's, on the same activations (the probe stops the forward after layer 3)
    capture = KeyCapture(model, layers, masks=[b["attention_mask"] for b in batches])
    config = KeySpaceDetectionConfig(layers=layers, eps=1e-5)
    method = unlearned.fit(config, forget=batches, tokenizer=tok, show_progress=False)
    capture.remove()
    assert method.state["count"].tolist() == [len(FORGET)] * 2
    for row, layer in enumerate(layers):
        vectors = capture.array(layer)
        assert vectors.shape == (len(FORGET), model.config.intermediate_size)
        mu, sd, k_ref = numpy_reference(vectors, config.eps)
        np.testing.assert_allclose(method.state["center"][row].numpy(), mu, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(method.state["scale"][row].numpy(), sd, rtol=1e-9, atol=1e-12)
        assert method.state["k"][row].item() == pytest.approx(k_ref, rel=1e-9)
        # the library's own test on the fitted vectors
        at_one = unlearned.attachments["key_space_detection"].layers[layer].inside(torch.from_numpy(vectors))
        assert bool(at_one.all())
        below = KeySpaceLayer(
            method.state["center"][row], method.state["scale"][row], method.state["k"][row], 1 - 1e-9, "cpu"
        )
        assert not bool(below.inside(torch.from_numpy(vectors)).all())
        # and the numpy decision agrees: a radius just below k_ref leaves a vector outside
        z = np.abs(vectors - mu) / sd
        assert (z <= k_ref).all() and not (z <= k_ref * (1 - 1e-9)).all()


def test_no_probe_vectors_are_kept(tok):
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    method = unlearned.fit(
        KeySpaceDetectionConfig(layers=[2]), forget=FORGET, tokenizer=tok, show_progress=False
    )
    d_ff = model.config.intermediate_size
    shapes = {k: tuple(v.shape) for k, v in method.state.items()}
    assert shapes["center"] == shapes["scale"] == (1, d_ff)
    assert all(len(FORGET) not in s for s in shapes.values())  # nothing is stored per query


@pytest.mark.parametrize("rule", ["all", "any"])
def test_decisions_match_a_numpy_reference(tok, rule):
    """Per-row decisions of ``detect`` (left padding, mixed batch) equal a numpy evaluation of the hypercube test
    on vectors we capture ourselves, for several layers and alphas that split the rows both ways."""
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    layers = [0, 2]
    fitted = unlearned.fit(
        KeySpaceDetectionConfig(layers=layers, rule=rule, inputs="prompts"),
        forget=FORGET[:8],
        tokenizer=tok,
        show_progress=False,
    )
    unlearned.remove_method("key_space_detection")
    texts = FORGET + OTHER  # 8 fitted queries, 5 unseen ones, 6 others
    batch = dict(encode(tok, texts, "left"))
    capture = KeyCapture(model, layers).run(model, [batch])
    capture.remove()
    z = {}
    for row, layer in enumerate(layers):
        v = capture.array(layer)
        mu, sd = fitted.state["center"][row].numpy(), fitted.state["scale"][row].numpy()
        z[layer] = (np.abs(v - mu) / sd).max(1) / fitted.state["k"][row].item()  # inside iff z <= alpha
    # alphas between observed values, so each one splits the rows differently, taken only from gaps wider than
    # 0.2%: rows that set k sit at 1 ± 1e-6 at both layers (measured: 1.0 and 1.0000004), and an alpha between two
    # such values would leave the outcome to float rounding (cross-machine noise measured ~1e-6 relative)
    values = np.unique(np.concatenate(list(z.values())))
    gaps = [(a, b) for a, b in zip(values[:-1], values[1:]) if b > a * 1.002]
    alphas = [float((a + b) / 2) for a, b in gaps][:: max(1, len(gaps) // 6)]
    seen = set()
    for alpha in alphas:
        per_layer = np.stack([z[i] <= alpha for i in layers])
        expected = per_layer.all(0) if rule == "all" else per_layer.any(0)
        margin = np.abs(np.stack(list(z.values())) / alpha - 1).min()
        assert margin > 5e-4  # no row sits near the boundary, where float32 noise could flip it
        method = KeySpaceDetection(dataclasses.replace(fitted.config, alpha=alpha), fitted.state)
        unlearned.add_method("ksd", method)
        try:
            flags = unlearned.detect(batch["input_ids"], batch["attention_mask"])
        finally:
            unlearned.remove_method("ksd")
        assert flags.tolist() == expected.tolist(), alpha
        seen.add(tuple(expected.tolist()))
    assert len(seen) >= 3  # the comparison covered several different splits


def test_separable_tiny_model_abstains_on_the_forget_rows(tok):
    """The construction the other tests rely on: fitted on the forget queries, the mixed batch splits exactly."""
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    unlearned.fit(
        KeySpaceDetectionConfig(layers=[1], alpha=1.5), forget=FORGET, tokenizer=tok, show_progress=False
    )
    texts = [FORGET[0], OTHER[0], FORGET[5], OTHER[3], OTHER[4], FORGET[9]]
    expected = [t in FORGET for t in texts]
    for side in ("left", "right"):
        batch = encode(tok, texts, side)
        assert unlearned.detect(batch["input_ids"], batch["attention_mask"]).tolist() == expected
    # one row at a time, without any padding, gives the same decisions
    single = [unlearned.detect(tok(t, return_tensors="pt")["input_ids"]).item() for t in texts]
    assert single == expected


def test_default_layer_alpha_and_config_copy(tok):
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    config = KeySpaceDetectionConfig()
    method = unlearned.fit(config, forget=FORGET, tokenizer=tok, show_progress=False)
    # without retain data nothing is calibrated: the middle layer, alpha 1, the narrowest window that reaches the
    # question's end in every rendering (the chat template's closing tokens are the longest)
    assert method.config.layers == [N_LAYERS // 2] and method.state["layers"].tolist() == [N_LAYERS // 2]
    assert config.layers == "auto" and config.alpha == "auto"  # the user's config is not modified
    assert method.config.alpha == 1.0
    closing = tok.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
    )
    closing = closing[closing.rindex("x") + 1 :]
    assert method.config.window == len(tok(closing, add_special_tokens=False)["input_ids"]) + 1
    unlearned.remove_method("key_space_detection")
    method = unlearned.fit(
        KeySpaceDetectionConfig(layers=[-1, 0]), forget=FORGET, tokenizer=tok, show_progress=False
    )
    assert method.config.layers == [0, N_LAYERS - 1]  # resolved and sorted; the state validates against it
    KeySpaceDetection(method.config, method.state_dict())  # a reloaded method validates


# -- forward (scoring) semantics -----------------------------------------------------------------------------


@pytest.fixture
def separable(tok):
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    method = unlearned.fit(
        KeySpaceDetectionConfig(layers=[1], alpha=1.5), forget=FORGET, tokenizer=tok, show_progress=False
    )
    return model, unlearned, method


@pytest.mark.parametrize("side", ["left", "right"])
def test_scoring_forward_semantics(separable, tok, side):
    """A forward without cache is its own request: abstaining rows get one-hot logits of the refusal's first token
    at every position; other rows are bit-for-bit the base model's; the loss is recomputed from the forced logits."""
    model, unlearned, method = separable
    texts = [OTHER[0], FORGET[2], OTHER[1], FORGET[7]]
    batch = encode(tok, texts, side)
    with torch.no_grad():
        base = model(**batch).logits
        out = unlearned(**batch).logits
        direct = unlearned.forward(**batch).logits  # calling forward directly applies the method as well
    first = tok(method.config.refusal, add_special_tokens=False)["input_ids"][0]
    for row, text in enumerate(texts):
        if text in FORGET:
            expected = torch.full_like(out[row], float("-inf"))
            expected[:, first] = 0.0
            assert torch.equal(out[row], expected)
        else:
            assert torch.equal(out[row], base[row])
    assert torch.equal(direct, out)
    # a second call is a new request: same result (no state leaks between calls)
    with torch.no_grad():
        assert torch.equal(unlearned(**batch).logits, out)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        scored = unlearned(**batch, labels=labels)
        as_tuple = unlearned(**batch, labels=labels, return_dict=False)
    shift_logits, shift_labels = out[:, :-1].reshape(-1, out.shape[-1]), labels[:, 1:].reshape(-1)
    reference = torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    assert torch.equal(scored.logits, out)
    assert torch.equal(scored.loss, reference) and torch.equal(as_tuple[0], reference)
    assert torch.equal(as_tuple[1], out)
    with torch.no_grad(), unlearned.disable_abstention():
        assert torch.equal(unlearned(**batch).logits, base)


def test_forward_keeps_the_base_signature(separable):
    """``generate`` and pipelines inspect ``forward`` (e.g. for ``logits_to_keep``): it must look like the base's."""
    import inspect

    model, unlearned, _ = separable
    assert inspect.signature(unlearned.forward) == inspect.signature(model.forward)
    assert unlearned._supports_logits_to_keep()


def test_eos_action_scoring(tok):
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    method = unlearned.fit(
        KeySpaceDetectionConfig(layers=[1], alpha=1.5, action="eos"),
        forget=FORGET,
        tokenizer=tok,
        show_progress=False,
    )
    assert method.state["refusal_ids"].numel() == 0
    batch = encode(tok, [FORGET[0], OTHER[0]])
    with torch.no_grad():
        logits = unlearned(**batch).logits
    assert (logits[0].argmax(-1) == model.generation_config.eos_token_id).all()
    assert torch.isinf(logits[0]).sum().item() == logits.shape[1] * (logits.shape[2] - 1)


# -- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0.0), "alpha must be > 0"),
        (dict(alpha=-1.0), "alpha must be > 0"),
        (dict(alpha=float("nan")), "alpha must be a finite number"),
        (dict(eps=0.0), "eps must be > 0"),
        (dict(layers=[]), "non-empty list of ints"),
        (dict(layers=[1.5]), "non-empty list of ints"),
        (dict(rule="most"), "rule must be one of"),
        (dict(action="shout"), "action must be one of"),
        (dict(refusal="   "), "non-empty refusal"),
    ],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KeySpaceDetectionConfig(**kwargs)


class EmptyTokenizer:
    """Wraps a real tokenizer but turns the refusal text into no tokens (as a tokenizer that drops it would)."""

    def __init__(self, tok, refusal):
        self.tok, self.refusal = tok, refusal

    def __len__(self):
        return len(self.tok)

    def __call__(self, text, **kwargs):
        if text == self.refusal:
            return {"input_ids": []}
        return self.tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize(
    "case", ["layer_out_of_range", "negative_out_of_range", "one_query", "empty_refusal", "empty_query"]
)
def test_failed_fit_is_clear_and_leaves_no_hooks(tok, case):
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    before = hook_counts(model)
    config, forget, tokenizer = KeySpaceDetectionConfig(layers=[1]), FORGET, tok
    if case == "layer_out_of_range":
        config, message = KeySpaceDetectionConfig(layers=[N_LAYERS]), f"Layer {N_LAYERS} is out of range"
    elif case == "negative_out_of_range":
        config, message = KeySpaceDetectionConfig(layers=[0, -N_LAYERS - 1]), "out of range"
    elif case == "one_query":
        forget, message = FORGET[:1], "at least 2 forget queries"
    elif case == "empty_query":  # named by its index in the forget data (every query was "Query 0", a review)
        forget, message = [*FORGET, " "], f"Query {len(FORGET)} is an empty question"
    else:
        tokenizer, message = EmptyTokenizer(tok, config.refusal), "tokenizes to no tokens"
    with pytest.raises(ValueError, match=message):
        unlearned.fit(config, forget=forget, tokenizer=tokenizer, show_progress=False)
    assert hook_counts(model) == before
    assert not unlearned.methods and not unlearned.has_abstention
    with pytest.raises(RuntimeError, match="No abstaining method"):
        unlearned.detect(encode(tok, OTHER[:1])["input_ids"])


def test_bad_state_is_refused(separable):
    _, _, method = separable
    state = method.state_dict()
    bad = dict(state, scale=state["scale"].clone().fill_(0.0))
    with pytest.raises(ValueError, match="non-positive"):
        KeySpaceDetection(method.config, bad)
    with pytest.raises(ValueError, match="do not match config layers"):
        KeySpaceDetection(dataclasses.replace(method.config, layers=[2]), state)
    with pytest.raises(ValueError, match="shape"):
        KeySpaceDetection(method.config, dict(state, center=state["center"][:, :5]))


def test_detect_input_checks(separable, tok):
    _, unlearned, _ = separable
    ids = encode(tok, OTHER[:2])["input_ids"]
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        unlearned.detect(ids[0])
    with pytest.raises(ValueError, match="does not match"):
        unlearned.detect(ids, torch.ones(2, ids.shape[1] + 1, dtype=torch.long))


def test_hypercubes_follow_the_vectors_to_another_device():
    """A KSD method attached on one device and run on another (the model moved since: ``.to("cuda")`` after fitting
    on the CPU) moved its hypercubes along; before, the test failed on mixed devices (a review). Attached here on
    the meta device, asked about CPU vectors: the answer is numpy's."""
    from test_moe import moe_model

    from unlearn_hf.methods.key_space_detection.key_units import RoutedUnit
    from unlearn_hf.sites import find_ffl_sites

    gen = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(8, generator=gen), torch.rand(8, generator=gen) + 0.5
    vectors = torch.randn(5, 8, generator=gen) * 2
    z = np.abs(vectors.double().numpy() - mu.double().numpy()) / sigma.double().numpy()
    layer = KeySpaceLayer(mu, sigma, k=1.5, alpha=1.0, device="meta")
    assert layer.center.device.type == "meta"
    np.testing.assert_allclose(layer.scaled(vectors).numpy(), z.max(-1) / 1.5, rtol=1e-15)
    assert layer.inside(vectors).tolist() == (z.max(-1) <= 1.5).tolist() and layer.center.device.type == "cpu"

    sites = [s for s in find_ffl_sites(moe_model("mixtral")) if s.routed and s.block == 0]
    width = sites[0].d_ff
    cubes = {
        s.layer: (torch.randn(width, generator=gen), torch.rand(width, generator=gen) + 0.5, 2.0)
        for s in sites
    }
    unit = RoutedUnit(sites, cubes, "meta")
    keys, tokens = torch.randn(3, width, generator=gen), torch.tensor([0, 2, 3])
    run = unit.start(4, None, torch.device("cpu"))
    run.add(sites[1].expert, keys, tokens)
    mu, sigma, _ = cubes[sites[1].layer]
    want = (np.abs(keys.double().numpy() - mu.double().numpy()) / sigma.double().numpy()).max(-1) / 2.0
    got = run.distances().numpy()
    np.testing.assert_allclose(got[[0, 2, 3]], want, rtol=1e-15)
    assert got[1] == np.inf


def test_retain_sets_named_by_numbers_save_as_json(tmp_path):
    """Calibration keys its table by the retain sets' names; names that are not strings are written as JSON writes
    them ("0"), and the checkpoint reads back (the compact writer had written them bare; a review)."""
    import json

    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    model = UnlearnedModelForCausalLM.from_base(tiny_llama(layers=4, vocab_size=len(tok)))
    retain = {0: OTHER * 3, 1: [o + " please" for o in OTHER] * 3}
    model.fit(KeySpaceDetectionConfig(layers=[1]), FORGET, retain, tok, show_progress=False)
    model.save_pretrained(tmp_path / "ksd", base_model_name_or_path="org/base")
    saved = json.loads((tmp_path / "ksd" / "unlearn_config.json").read_text())
    table = saved["methods"][0]["config"]["calibration"]["retain"]
    assert set(table) == {"0", "1"}
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "ksd", base_model=model.get_base_model())
    assert list(loaded.methods) == ["key_space_detection"]
