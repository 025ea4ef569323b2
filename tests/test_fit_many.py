"""``fit`` of a list of configs: the same result as consecutive calls (sequential) or as fits on the untouched
model (independent), with fewer forward passes where sharing changes nothing, and all or nothing on failure."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
)
from unlearn_hf.methods.selective_pruning import SelectivePruning

FORGET = [f"Question: what is {i} times {i + 2}?\nAnswer: {i * (i + 2)}" for i in range(12)]
RETAIN = [f"def f{i}(x):\n    return x + {i}" for i in range(12)]
KW = dict(show_progress=False)


@pytest.fixture()
def model():
    return tiny_llama(layers=3)


def count_forwards(model):
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, a, o: calls.append(1))
    return calls, handle


def assert_same_states(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        a, b = got[name].state_dict(), expected[name].state_dict()
        assert a.keys() == b.keys(), name
        for key in b:
            assert torch.equal(a[key], b[key]), (name, key)


def consecutive(model, tok, configs, names):
    ref = UnlearnedModelForCausalLM.from_base(model)
    for c, n in zip(configs, names):
        ref.fit(c, FORGET, RETAIN, tok, name=n, **KW)
    out = dict(ref.methods)
    ref.remove_all_methods()
    return out


def test_independent_fits_share_one_pass_per_data_set(model, smol_tokenizer):
    configs = [
        NeuronAdjustConfig(ratio=0.05),
        SelectivePruningConfig(ratio=0.05),
        NeuronAdjustConfig(ratio=0.1),
    ]
    names = ["na", "sp", "na_wide"]
    expected = {}  # each fitted alone on the untouched model
    for c, n in zip(configs, names):
        alone = UnlearnedModelForCausalLM.from_base(model)
        expected[n] = alone.fit(c, FORGET, RETAIN, smol_tokenizer, **KW)
        alone.remove_all_methods()
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    calls, handle = count_forwards(model)
    try:
        methods = unlearned.fit(configs, FORGET, RETAIN, smol_tokenizer, name=names, independent=True, **KW)
    finally:
        handle.remove()
    n_batches = 2  # 12 short texts fit one batch of the default budget, forget and retain
    assert len(calls) == n_batches  # one pass per data set instead of one per config
    assert [m.config for m in methods] == configs
    assert_same_states(unlearned.methods, expected)


@pytest.mark.parametrize(
    "configs, kept",
    [
        ([NeuronAdjustConfig(ratio=0.05), NeuronAdjustConfig(ratio=0.1)], {("moments",)}),
        ([SelectivePruningConfig(ratio=0.05), SelectivePruningConfig(ratio=0.1)], {("abs",)}),
        # the pre-activations' moments for Neuron Adjust, the keys' sum |x| for Selective Pruning
        ([NeuronAdjustConfig(ratio=0.05), SelectivePruningConfig(ratio=0.05)], {("moments",), ("abs",)}),
    ],
)
def test_a_shared_pass_keeps_what_its_methods_read(model, smol_tokenizer, monkeypatch, configs, kept):
    """Each statistic costs a pass over every activation: a pass shared by several fits keeps, at each site kind,
    the union of what the fits probing it read, no more."""
    from unlearn_hf import stats as stats_mod

    seen = set()
    tracking = stats_mod.RunningStats.tracking.__func__

    def spy(cls, dim, quantities, **values):
        seen.add(tuple(quantities))
        return tracking(cls, dim, quantities, **values)

    monkeypatch.setattr(stats_mod.RunningStats, "tracking", classmethod(spy))
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    calls, handle = count_forwards(model)
    try:
        unlearned.fit(configs, FORGET, RETAIN, smol_tokenizer, name=["a", "b"], independent=True, **KW)
    finally:
        handle.remove()
    assert len(calls) == 2  # shared: one pass per data set
    assert seen == kept
    unlearned.remove_all_methods()


def test_sequential_fits_equal_consecutive_calls_and_share_only_where_nothing_changed(model, smol_tokenizer):
    # Selective Pruning probes the keys of layer 0, which Neuron Adjust on layer 2 does not reach: shared
    shared = [NeuronAdjustConfig(ratio=0.05, layers=[2]), SelectivePruningConfig(ratio=0.05, layers=[0])]
    # ... but Neuron Adjust on layer 0 changes what layer 1 computes: Selective Pruning is probed again, NA active
    dependent = [NeuronAdjustConfig(ratio=0.05, layers=[0]), SelectivePruningConfig(ratio=0.05, layers=[1])]
    for configs, passes in ((shared, 2), (dependent, 4)):
        expected = consecutive(model, smol_tokenizer, configs, ["neuron_adjust", "selective_pruning"])
        unlearned = UnlearnedModelForCausalLM.from_base(model)
        calls, handle = count_forwards(model)
        try:
            unlearned.fit(configs, FORGET, RETAIN, smol_tokenizer, **KW)
        finally:
            handle.remove()
        assert len(calls) == passes
        assert_same_states(unlearned.methods, expected)
    # the dependent pair really differs from fitting Selective Pruning alone: the sequential meaning is kept
    alone = UnlearnedModelForCausalLM.from_base(model).fit(dependent[1], FORGET, RETAIN, smol_tokenizer, **KW)
    assert not torch.equal(alone.state["score"], unlearned.methods["selective_pruning"].state["score"])


def test_a_failing_fit_leaves_nothing_attached(model, smol_tokenizer, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("probe failed")

    unlearned = UnlearnedModelForCausalLM.from_base(model)
    ids = smol_tokenizer(FORGET[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**ids).logits
    monkeypatch.setattr(SelectivePruning, "fit", classmethod(broken))
    SP = SelectivePruningConfig(ratio=0.05)
    for independent in (False, True):
        with pytest.raises(RuntimeError, match="probe failed"):
            unlearned.fit(
                [
                    KeySpaceDetectionConfig(layers=[1], alpha=1.0, window=1),
                    NeuronAdjustConfig(ratio=0.05),
                    SP,
                ],
                FORGET,
                RETAIN,
                smol_tokenizer,
                independent=independent,
                **KW,
            )
        assert dict(unlearned.methods) == {}
        with torch.no_grad():
            assert torch.equal(unlearned(**ids).logits, before)


def test_bad_lists_are_refused_before_probing(model, smol_tokenizer):
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    calls, handle = count_forwards(model)
    try:
        with pytest.raises(ValueError, match="given twice"):
            unlearned.fit([NeuronAdjustConfig(), NeuronAdjustConfig()], FORGET, RETAIN, smol_tokenizer, **KW)
        with pytest.raises(ValueError, match="2 names for 1 configs"):
            unlearned.fit([NeuronAdjustConfig()], FORGET, RETAIN, smol_tokenizer, name=["a", "b"], **KW)
        with pytest.raises(TypeError, match="method config"):
            unlearned.fit([NeuronAdjustConfig(), "sp"], FORGET, RETAIN, smol_tokenizer, **KW)
        with pytest.raises(ValueError, match="empty list"):
            unlearned.fit([], FORGET, RETAIN, smol_tokenizer, **KW)
        # a generator is read once: the second config saw no batches, and the error said the data was empty
        batches = [dict(smol_tokenizer(FORGET[:2], return_tensors="pt", padding=True))]
        both = [NeuronAdjustConfig(), SelectivePruningConfig()]
        with pytest.raises(ValueError, match="the forget data .* a generator can be read only once"):
            unlearned.fit(both, (b for b in batches), batches, **KW)
        with pytest.raises(ValueError, match="the retain data .* a list_iterator can be read only once"):
            unlearned.fit(both, batches, iter(batches), **KW)
    finally:
        handle.remove()
    assert calls == [] and dict(unlearned.methods) == {}
