"""Several methods on one model: a method fitted after others is probed with them active.

Key Space Detection fitted after Neuron Adjust must describe the key vectors the model produces *with* Neuron
Adjust in place, otherwise its hypercube is fitted on activations the deployed model never computes. The
reference below applies Neuron Adjust by hand (float64, in a hook of our own on the plain base model) and
computes μ, σ and k with numpy.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from helpers_ksd import FORGET, OTHER, KeyCapture, batches_of, numpy_reference
from tiny_models import tiny_llama

from unlearn_hf import KeySpaceDetectionConfig, NeuronAdjustConfig, UnlearnedModelForCausalLM

N_LAYERS = 4
KSD_LAYER = 2


def hand_neuron_adjust(state: dict[str, torch.Tensor], layer: int):
    """A forward hook on ``gate_proj`` of ``layer`` applying deterministic Neuron Adjust (METHOD.md §3) in
    float64: where log pF(x) > log pR(x), x becomes μR − (x − μF)/σF · σR."""
    sel = state["layer_index"] == layer
    idx = state["neuron_index"][sel]
    mf, sf, mr, sr = (
        state[n][sel].double() for n in ("forget_mean", "forget_std", "retain_mean", "retain_std")
    )

    def hook(module, args, output):
        x = output[..., idx].double()
        log_pf = -0.5 * ((x - mf) / sf) ** 2 - torch.log(sf)
        log_pr = -0.5 * ((x - mr) / sr) ** 2 - torch.log(sr)
        new = torch.where(log_pf > log_pr, mr - (x - mf) / sf * sr, x)
        output = output.clone()
        output[..., idx] = new.to(output.dtype)
        return output

    return hook


def test_ksd_fitted_after_neuron_adjust_sees_adjusted_keys(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    model = tiny_llama(layers=N_LAYERS)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    na = unlearned.fit(
        NeuronAdjustConfig(ratio=0.25, deterministic=True),
        forget=FORGET,
        retain=OTHER,
        tokenizer=tok,
        show_progress=False,
    )
    assert set(na.state["layer_index"].tolist()) & set(range(KSD_LAYER + 1))  # NA acts before the KSD layer
    batches = batches_of(tok, FORGET)
    # α a hair above 1: the query that sets k lies exactly on the boundary, and generate's batch layout (left
    # padding, one batch) rounds its key differently from the fit's (measured: 1 + 5e-7 of the threshold); 1e-3
    # leaves a margin of 2000x that rounding, far below the distance to the plain model's keys (checked below)
    config = KeySpaceDetectionConfig(layers=[KSD_LAYER], eps=1e-5, alpha=1.001)
    ksd = unlearned.fit(config, forget=batches, tokenizer=tok, show_progress=False)

    # reference: the plain base model, Neuron Adjust applied by our own hooks, keys captured by our own hooks
    handles = [
        model.model.layers[i].mlp.gate_proj.register_forward_hook(hand_neuron_adjust(na.state, i))
        for i in range(N_LAYERS)
    ]
    capture = KeyCapture(model, [KSD_LAYER]).run(model, batches)
    for h in [*handles, *capture.handles]:
        h.remove()
    adjusted = capture.array(KSD_LAYER)
    capture = KeyCapture(model, [KSD_LAYER]).run(model, batches)
    capture.remove()
    plain = capture.array(KSD_LAYER)

    mu, sd, k = numpy_reference(adjusted, config.eps)
    np.testing.assert_allclose(ksd.state["center"][0].numpy(), mu, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ksd.state["scale"][0].numpy(), sd, rtol=1e-4, atol=1e-6)
    assert abs(ksd.state["k"][0].item() - k) <= 1e-3 * k
    # ... and not the keys of the plain model: Neuron Adjust really changed what KSD was fitted on
    mu_plain = plain.mean(0)
    assert np.abs(mu_plain - mu).max() > 100 * np.abs(ksd.state["center"][0].numpy() - mu).max()

    # deployed together, every fitted query is inside the hypercube (α ≥ 1 covers every fitted vector)
    tok.padding_side = "left"
    out = unlearned.generate(
        **tok(FORGET, return_tensors="pt", padding=True), max_new_tokens=2, return_dict_in_generate=True
    )
    assert out.abstained.all()

    # each is removable on its own; removing both restores the base model exactly
    enc = tok(OTHER, return_tensors="pt", padding=True)
    with torch.no_grad():
        base_logits = model(**enc).logits
        unlearned.remove_method("neuron_adjust")
        assert list(unlearned.methods) == ["key_space_detection"]
        unlearned.remove_method("key_space_detection")
        assert torch.equal(unlearned(**enc).logits, base_logits)
