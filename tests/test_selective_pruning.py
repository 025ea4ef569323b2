"""Selective Pruning against captured key tensors and a numpy importance ranking; several methods (Neuron
Adjust, Selective Pruning, Key Space Detection) attached together and removed one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_na import FORGET, RETAIN, Capture, token_batches
from tiny_models import hook_count, tiny_llama

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
    probe,
)
from unlearn_hf.methods import SelectivePruning
from unlearn_hf.methods.selection import selection_size

KEYS3 = [f"model.layers.{i}.mlp.down_proj" for i in range(3)]


def capture_keys(model, batches):
    """Key vectors (inputs of ``down_proj``) of every layer at real tokens, with our own pre-hooks."""
    cap = Capture(
        model, [f"model.layers.{i}.mlp.down_proj" for i in range(len(model.model.layers))], inputs=True
    )
    try:
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    finally:
        cap.remove()
    masks = [b["attention_mask"].bool() for b in batches]
    return [torch.cat([v[m] for v, m in zip(vals, masks)]).double().numpy() for vals in cap.values.values()]


def fit_sp(model, ratio=0.1, **kw):
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    sp = unlearned.fit(
        SelectivePruningConfig(ratio=ratio, **kw),
        token_batches(0, **FORGET),
        token_batches(1, **RETAIN),
        show_progress=False,
    )
    return unlearned, sp


def test_importance_and_selection_equal_numpy_brute_force():
    model = tiny_llama(layers=3)
    eps = 1e-6
    unlearned, sp = fit_sp(model, ratio=0.07, eps=eps)
    f = capture_keys(model, token_batches(0, **FORGET))
    r = capture_keys(model, token_batches(1, **RETAIN))
    triples = []
    for i in range(3):
        importance = np.abs(f[i]).mean(0) / (np.abs(r[i]).mean(0) + eps)
        triples += [(i, j, v) for j, v in enumerate(importance)]
    best = sorted(triples, key=lambda t: (-t[2], t[0], t[1]))[: selection_size(0.07, len(triples))]
    assert sp.state["layer_index"].tolist() == [t[0] for t in best]
    assert sp.state["neuron_index"].tolist() == [t[1] for t in best]
    np.testing.assert_allclose(sp.state["score"].double().numpy(), [t[2] for t in best], rtol=1e-5)
    unlearned.remove_all_methods()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruning_zeroes_exactly_the_chosen_key_neurons(dtype):
    model = tiny_llama(layers=3).to(dtype)
    unlearned, sp = fit_sp(model, ratio=0.1)
    unlearned.remove_method("selective_pruning")
    before = Capture(model, KEYS3, inputs=True)  # runs before the pruning hook
    unlearned.add_method("selective_pruning", sp)
    after = Capture(model, KEYS3, inputs=True)  # runs after it
    batch = token_batches(2, **FORGET, n=1)[0]
    with torch.no_grad():
        unlearned(**batch)
        base_logits = model(**batch).logits
    before.remove()
    after.remove()
    pruned_layers = set(sp.state["layer_index"].tolist())
    for i, name in enumerate(KEYS3):
        x, y = before.values[name][0], after.values[name][0]
        cols = sp.state["neuron_index"][sp.state["layer_index"] == i]
        expected = x.clone()
        expected[..., cols] = 0
        assert y.dtype == dtype
        assert torch.equal(y, expected), f"layer {i}"
        if i in pruned_layers:
            assert (x[..., cols] != 0).any()  # something was actually zeroed
    # up to the first pruned layer, the keys are exactly the base model's
    first = min(pruned_layers)
    for i in range(first + 1):
        assert torch.equal(before.values[KEYS3[i]][0], before.values[KEYS3[i]][1])
    unlearned.remove_all_methods()
    with torch.no_grad():
        assert torch.equal(unlearned(**batch).logits, base_logits)


def test_one_token_forget_set_is_accepted():
    """Documented: mean |x| is defined by a single token, so Selective Pruning fits on it (Neuron Adjust, which
    needs a standard deviation, refuses)."""
    model = tiny_llama(layers=2)
    one = [{"input_ids": torch.tensor([[17]]), "attention_mask": torch.tensor([[1]])}]
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    sp = unlearned.fit(
        SelectivePruningConfig(ratio=0.05), one, token_batches(1, **RETAIN), show_progress=False
    )
    f, r = capture_keys(model, one), capture_keys(model, token_batches(1, **RETAIN))
    importance = [np.abs(f[i][0]) / (np.abs(r[i]).mean(0) + 1e-6) for i in range(2)]
    got = [
        importance[i][j] for i, j in zip(sp.state["layer_index"].tolist(), sp.state["neuron_index"].tolist())
    ]
    np.testing.assert_allclose(sp.state["score"].double().numpy(), got, rtol=1e-5)
    assert got[-1] >= np.sort(np.concatenate(importance))[-len(got)]
    unlearned.remove_all_methods()


def test_bad_input_raises_and_leaves_no_hooks():
    model = tiny_llama(layers=2)
    other = tiny_llama(layers=3, seed=1)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    forget = token_batches(0, **FORGET)
    out_of_vocab = token_batches(1, **RETAIN)
    out_of_vocab[0]["input_ids"][1, 1] = 10**6
    cases = [
        (dict(forget=forget, retain=None), "retain"),
        (dict(forget=forget, retain=[]), "empty"),
        (dict(forget=None, retain=forget), "forget"),
        (dict(forget=forget, retain=out_of_vocab), "vocab"),
        (
            dict(forget=probe(other, forget, site="key", show_progress=False), retain=forget),
            "different model",
        ),
        (dict(forget=probe(model, forget, site="pre", show_progress=False), retain=forget), "site"),
        (
            dict(
                forget=probe(model, forget, site="key", statistics=["moments"], show_progress=False),
                retain=forget,
            ),
            r"lack the statistics \['abs'\]",
        ),
    ]
    for data, match in cases:
        with pytest.raises(ValueError, match=match):
            unlearned.fit(SelectivePruningConfig(ratio=0.1), **data, show_progress=False)
        assert hook_count(model) == 0 and not unlearned.methods
    _, sp = fit_sp(tiny_llama(layers=3), ratio=0.1)
    with pytest.raises(ValueError, match="layers"):  # fitted on 3 layers, attached to 2
        unlearned.add_method("sp", SelectivePruning(sp.config, sp.state_dict()))
    assert hook_count(model) == 0 and not unlearned.methods


def test_each_method_probes_only_the_statistics_it_reads(monkeypatch):
    """Every statistic costs the probe a pass over the activations: Neuron Adjust keeps the moments of the
    pre-activations, Selective Pruning mean |x| of the keys, Key Space Detection the moments and extremes of its
    query keys; the selections equal those from full statistics."""
    from unlearn_hf import stats as stats_mod

    kept = []
    tracking = stats_mod.RunningStats.tracking.__func__

    def spy(cls, dim, quantities, **values):
        kept.append(tuple(quantities))
        return tracking(cls, dim, quantities, **values)

    model = tiny_llama(layers=3)
    forget, retain = token_batches(0, **FORGET), token_batches(1, **RETAIN)
    full = {
        site: [probe(model, data, site=site, show_progress=False) for data in (forget, retain)]
        for site in ("pre", "key")
    }
    monkeypatch.setattr(stats_mod.RunningStats, "tracking", classmethod(spy))
    cases = [
        (NeuronAdjustConfig(ratio=0.1, deterministic=True), "pre", {("moments",)}),
        (SelectivePruningConfig(ratio=0.1), "key", {("abs",)}),
        (
            KeySpaceDetectionConfig(inputs="prompts", layers=[1], alpha=1.0, window=1, action="eos"),
            None,
            {("moments", "extremes")},
        ),
    ]
    for config, site, quantities in cases:
        kept.clear()
        unlearned = UnlearnedModelForCausalLM.from_base(model)
        method = unlearned.fit(config, forget, retain if site else None, show_progress=False)
        assert set(kept) == quantities, type(config).__name__
        if site:
            again = UnlearnedModelForCausalLM.from_base(model).fit(config, *full[site], show_progress=False)
            assert torch.equal(method.state["neuron_index"], again.state["neuron_index"])
            assert torch.equal(method.state["layer_index"], again.state["layer_index"])
        unlearned.remove_all_methods()


# -- several methods at once -----------------------------------------------------------------------------------


def test_methods_attach_together_and_detach_one_by_one(smol_tokenizer):
    model = tiny_llama(layers=3)
    batch = token_batches(3, **FORGET, n=1)[0]
    with torch.no_grad():
        base = model(**batch).logits
    forget, retain = token_batches(0, **FORGET), token_batches(1, **RETAIN)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    configs = {
        "na": NeuronAdjustConfig(ratio=0.1, seed=1),
        "sp": SelectivePruningConfig(ratio=0.05),
        "na2": NeuronAdjustConfig(ratio=0.05, score="abs_mean_diff", seed=2),
        "ksd": KeySpaceDetectionConfig(layers=[1], alpha=1.0, window=1, inputs="prompts"),
    }
    methods = {}
    for name, cfg in configs.items():
        data = ["Question: 1 plus 2?\nAnswer:", "Question: 3 times 4?\nAnswer:"] if name == "ksd" else forget
        methods[name] = unlearned.fit(cfg, data, retain, smol_tokenizer, name=name, show_progress=False)
    hooks = {name: len(unlearned.attachments[name].hooks.handles) for name in methods}
    assert hook_count(model) == sum(hooks.values())

    def reference(names):
        """The same methods attached, in the same order, to a fresh wrapper over the same base model."""
        fresh = UnlearnedModelForCausalLM.from_base(model)
        for n in names:
            fresh.add_method(n, methods[n])
        with torch.no_grad():
            out = fresh(**batch).logits
        fresh.remove_all_methods()
        return out

    with torch.no_grad():
        combined = unlearned(**batch).logits
    assert not torch.equal(combined, base)
    for off in ("na", "sp"):  # switching one off is the same as not attaching it
        with torch.no_grad(), unlearned.disable_unlearning(off):
            assert torch.equal(unlearned(**batch).logits, reference([n for n in methods if n != off]))
    remaining = list(methods)
    for name in ("na", "ksd", "sp", "na2"):
        for n, m in list(unlearned.methods.items()):  # re-add after the reference wrappers borrowed them
            unlearned.remove_method(n)
            unlearned.add_method(n, m)
        removed = unlearned.remove_method(name)
        assert removed is methods[name]
        remaining.remove(name)
        assert hook_count(model) == sum(hooks[n] for n in remaining)
        with torch.no_grad():
            got = unlearned(**batch).logits
        if remaining:
            assert torch.equal(got, reference(remaining)), f"after removing {name}"
        else:
            assert torch.equal(got, base)
    assert hook_count(model) == 0
