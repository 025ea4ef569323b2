"""Token-budget batching: the plan's guarantees (checked by brute force), its use by every probe, and statistics
that do not depend on it."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from tiny_models import tiny_llama

from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM, probe
from unlearn_hf.batch_plan import DEFAULT_BATCH_TOKENS, default_batch_tokens, plan_batches
from unlearn_hf.data import DataSpec, iter_token_batches
from unlearn_hf.sites import find_ffl_sites
from unlearn_hf.stats import RunningStats, accumulation_device


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget, cap", [(64, None), (100, 3), (7, None), (1000, 1)])
def test_plan_properties_by_brute_force(seed, budget, cap):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 60))]
    plan = plan_batches(lengths, max_batch_tokens=budget, batch_size=cap)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))  # every example exactly once
    flat = [lengths[i] for b in plan for i in b]
    assert flat == sorted(lengths, reverse=True)  # longest first
    for n, b in enumerate(plan):
        width = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * width <= budget  # within the budget (a long example alone)
        assert cap is None or len(b) <= cap
        if n + 1 < len(plan):  # greedy: the next example did not fit
            grown = (len(b) + 1) * width > budget
            assert grown or (cap is not None and len(b) == cap)


def test_plan_refuses_bad_budgets():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_batches([3], max_batch_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches([3], max_batch_tokens=8, batch_size=0)
    for bad in (
        dict(batch_size=0),
        dict(max_batch_tokens=0),
        dict(max_batch_tokens=True),
        dict(batch_size=2.5),
    ):
        with pytest.raises(ValueError, match="integer >= 1"):
            DataSpec(**bad)


def test_default_budget_per_device():
    assert DataSpec().batch_tokens("cpu") == default_batch_tokens("cpu") == DEFAULT_BATCH_TOKENS["cpu"]
    assert DataSpec().batch_tokens(torch.device("cuda", 1)) == DEFAULT_BATCH_TOKENS["default"]
    assert DataSpec(max_batch_tokens=99).batch_tokens("cuda") == 99
    # a device without float64 accumulates on the host; the others where the activations are
    assert accumulation_device("mps") == torch.device("cpu")
    assert accumulation_device("cuda:1") == torch.device("cuda", 1)


def texts_of_mixed_length(n: int = 24) -> list[str]:
    rng = random.Random(0)
    return [" ".join(f"w{rng.randint(0, 50)}" for _ in range(rng.randint(1, 30))) for _ in range(n)]


def test_sorted_batches_pad_less_than_reading_order(smol_tokenizer):
    texts = texts_of_mixed_length()
    lengths = [len(smol_tokenizer(t)["input_ids"]) for t in texts]
    # reading order in batches of 6, computed by hand
    reading = [lengths[s : s + 6] for s in range(0, len(texts), 6)]
    reading_pad = 1 - sum(lengths) / sum(len(b) * max(b) for b in reading)
    _, batches = iter_token_batches(
        texts, smol_tokenizer, spec=DataSpec(batch_size=6, max_batch_tokens=10**6)
    )
    masks = [b.attention_mask for b in batches]
    sorted_pad = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert int(sum(m.sum() for m in masks)) == sum(lengths)
    assert sorted_pad < reading_pad / 2


def test_probe_forwards_stay_within_the_budget_and_equal_one_by_one(smol_tokenizer, caplog):
    model = tiny_llama(layers=2)
    texts = texts_of_mixed_length()
    shapes = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape)))
    budget = 400
    try:
        with caplog.at_level(logging.INFO, logger="unlearn_hf.batch_plan"):
            got = probe(
                model, texts, smol_tokenizer, spec=DataSpec(max_batch_tokens=budget), show_progress=False
            )
        n_budget = len(shapes)
        ref = probe(model, texts, smol_tokenizer, spec=DataSpec(batch_size=1), show_progress=False)
    finally:
        handle.remove()
    assert all(b == 1 or b * t <= budget for b, t in shapes[:n_budget])
    assert n_budget < len(texts) / 2  # several examples per forward
    real = sum(len(smol_tokenizer(t)["input_ids"]) for t in texts)
    padded = sum(b * t for b, t in shapes[:n_budget])
    assert f"{n_budget} batches, {real} tokens, {100 * (1 - real / padded):.1f}% padding" in caplog.text
    for layer, s in ref.layers.items():  # the same statistics, to the float32 rounding of the activations
        g = got.layers[layer]
        assert g.count == s.count == real
        for name in ("mean", "m2", "abs_sum"):
            torch.testing.assert_close(getattr(g, name), getattr(s, name), rtol=1e-5, atol=1e-7)


def test_ksd_fit_and_calibration_forwards_use_the_budget(smol_tokenizer):
    model = tiny_llama(layers=3)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    forget = [f"What is {i} plus {i * 3}?" + " Think." * (i % 4) for i in range(20)]
    retain = [f"Name a colour number {i}." + " Please." * (i % 3) for i in range(20)]
    site = find_ffl_sites(model)[0]
    shapes = []
    handle = site.pre.register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape[:2])))
    try:
        unlearned.fit(
            KeySpaceDetectionConfig(max_false_rate=0.2),
            forget,
            retain,
            smol_tokenizer,
            max_batch_tokens=64,
            show_progress=False,
        )
    finally:
        handle.remove()
    assert shapes and all(b == 1 or b * t <= 64 for b, t in shapes)
    assert max(b for b, _ in shapes) > 1


def test_statistics_stay_on_the_activations_device(monkeypatch):
    # a meta tensor has no values: any copy to the host raises, so these updates prove the sums never leave the
    # device (no host sync per batch) and are merged there
    s = RunningStats(4, track_extremes=True)
    x = torch.randn(5, 4, device="meta")
    s.update(x)
    s.update(x)
    assert s.count == 10 and s.mean.device.type == "meta" and s.maximum.device.type == "meta"
    # a device without float64 sends its activations to the host instead
    monkeypatch.setattr("unlearn_hf.stats.NO_FLOAT64", frozenset({"meta"}))
    with pytest.raises(NotImplementedError, match="meta"):
        RunningStats(4).update(x)
