"""``ratio="auto"`` for Neuron Adjust and Selective Pruning (issue 13, item 3): the held-out split, the held-out
accuracy, the choice and its saved curve, each checked against an independent computation on a tiny model."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_models import hook_count, tiny_model, tiny_tokenizer

from unlearn_hf import NeuronAdjustConfig, SelectivePruningConfig, UnlearnedModelForCausalLM
from unlearn_hf.data import DataSpec
from unlearn_hf.methods.ratio_search import (
    CURVE,
    DEFAULT_GRID,
    RatioSearchError,
    held_out_accuracy,
    split_examples,
)

GRID = [0.05, 0.2, 0.5, 1.0]


@pytest.fixture(scope="module")
def setup():
    """A tiny Llama whose vocabulary is the character tokenizer's, and texts it partly predicts: each is a
    random prefix followed by the model's own greedy continuation (so the base accuracy is far from 0)."""
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    g = torch.Generator().manual_seed(0)

    def texts(alphabet: str, n: int) -> list[str]:
        out = []
        for _ in range(n):
            prefix = "".join(alphabet[i] for i in torch.randint(len(alphabet), (6,), generator=g))
            ids = tok(prefix, return_tensors="pt").input_ids
            with torch.no_grad():
                gen = model.generate(
                    ids,
                    max_new_tokens=10,
                    do_sample=False,
                    pad_token_id=0,
                    bad_words_ids=[[0], [1], [2], [3]],
                )
            out.append("".join(tok.convert_ids_to_tokens(gen[0].tolist())))  # decode() puts spaces between
        return out

    return model, tok, texts("abcdefghijklm", 20), texts("0123456789+-=*", 20)


def brute_accuracy(model, tok, texts) -> float:
    """Next-token accuracy text by text, unpadded, over every token after the first."""
    correct = total = 0
    for t in texts:
        ids = tok(t, return_tensors="pt").input_ids
        with torch.no_grad():
            pred = model(ids).logits[0, :-1].argmax(-1)
        correct += int((pred == ids[0, 1:]).sum())
        total += ids.shape[1] - 1
    return correct / total


def reference_split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    k = max(1, round(fraction * n))
    return sorted(perm[k:]), sorted(perm[:k])


def test_config_validates_auto_fields():
    assert NeuronAdjustConfig(ratio="auto").ratio == "auto"
    assert SelectivePruningConfig(ratio="auto", ratio_grid=[0.2, 0.1]).ratio_grid == [0.1, 0.2]
    for bad in (
        dict(ratio="Auto"),
        dict(ratio="auto", max_retain_drop=0.0),
        dict(ratio="auto", max_retain_drop=1.0),
        dict(ratio="auto", holdout_fraction=1.5),
        dict(ratio="auto", ratio_grid=[]),
        dict(ratio="auto", ratio_grid=[0.1, 0.1]),
        dict(ratio="auto", ratio_grid=[0.1, 1.5]),
        dict(ratio="auto", ratio_grid="0.1"),
    ):
        for cls in (NeuronAdjustConfig, SelectivePruningConfig):
            with pytest.raises(ValueError, match=next(iter(k for k in bad if k != "ratio"), "ratio")):
                cls(**bad)


def test_split_is_seeded_disjoint_and_keeps_order():
    data = [f"text {i}" for i in range(23)]
    fit, held = split_examples(data, 0.2, "forget")
    ref_fit, ref_held = reference_split(23, 0.2)
    assert fit == [data[i] for i in ref_fit] and held == [data[i] for i in ref_held]
    assert len(held) == 5 and sorted(fit + held) == sorted(data)
    assert split_examples(data, 0.2, "forget") == (fit, held)  # the same every run


def test_copies_of_an_example_are_never_on_both_sides_of_the_split():
    """With every retain text given twice, 10 of 12 held-out rows were also fitted on and nothing said so (a review):
    the held-out drop was partly measured in-sample. Copies now go together (what the fit reads decides: a Dataset's
    id column does not make copies distinct), the held-out share is not overshot by a large group of copies, and
    without copies nothing changes."""
    datasets = pytest.importorskip("datasets")
    texts = [f"text {i}" for i in range(30)]
    data = texts + [f"  {t}" for t in texts[::-1]]
    fit, held = split_examples(data, 0.2, "retain")
    assert not {x.strip() for x in fit} & {x.strip() for x in held}
    assert len(fit) + len(held) == len(data) and len(held) == round(0.2 * len(data))
    assert [x for x in data if x in fit] == fit  # each part in its order
    table = datasets.Dataset.from_dict({"text": data, "id": list(range(len(data)))})
    fit_t, held_t = split_examples(table, 0.2, "retain")
    assert not {x.strip() for x in fit_t["text"]} & {x.strip() for x in held_t["text"]}
    pairs = [{"q": t, "a": "x", "id": i} for i, t in enumerate(data)]
    spec = DataSpec(prompt_column="q", completion_column="a")
    fit_p, held_p = split_examples(pairs, 0.2, "retain", spec, "completion")
    assert not {p["q"].strip() for p in fit_p} & {p["q"].strip() for p in held_p}
    # 30 copies of one text and 10 others at 10%: 4 held out, not the 30 copies (it held 31 and fitted on 9)
    skewed = ["same"] * 30 + [f"other {i}" for i in range(10)]
    fit_s, held_s = split_examples(skewed, 0.1, "forget")
    assert len(held_s) == 4 and "same" not in held_s
    fit_s, held_s = split_examples(
        ["same"] * 6 + ["a", "b", "c"], 0.1, "forget"
    )  # no one fits: the fewest copies
    assert len(held_s) == 1 and "same" not in held_s
    distinct = [f"text {i}" for i in range(23)]  # no copies: the seeded permutation's rows, as before
    assert split_examples(distinct, 0.2, "forget") == tuple(
        [distinct[i] for i in part] for part in reference_split(23, 0.2)
    )


def test_split_accepts_datasets_and_refuses_what_cannot_be_held_out():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(10)]})
    fit, held = split_examples(ds, 0.3, "retain")
    assert held["text"] == [f"t{i}" for i in reference_split(10, 0.3)[1]] and len(fit) == 7
    with pytest.raises(ValueError, match="too few"):
        split_examples(["a", "b"], 0.2, "forget")
    with pytest.raises(ValueError, match="tokenized batches"):
        split_examples([{"input_ids": torch.ones(1, 3, dtype=torch.long)}] * 5, 0.2, "forget")
    with pytest.raises(ValueError, match="a list or a datasets.Dataset"):
        split_examples(iter(["a"] * 5), 0.2, "forget")


@pytest.mark.parametrize("side", ["left", "right"])
def test_held_out_accuracy_equals_unpadded_brute_force(setup, side):
    model, tok, forget, _ = setup
    padded = copy.deepcopy(tok)
    padded.padding_side = side
    got = held_out_accuracy(model, forget, padded, mode="all", spec=DataSpec(batch_size=3))
    assert got == pytest.approx(brute_accuracy(model, tok, forget), abs=1e-12)
    assert 0.2 < got < 1.0


def test_held_out_accuracy_on_completions_counts_only_completion_tokens(setup):
    model, tok, forget, _ = setup
    pairs = [{"prompt": t[:6], "completion": t[6:]} for t in forget]
    spec = DataSpec(prompt_column="prompt", completion_column="completion", batch_size=4)
    got = held_out_accuracy(model, pairs, tok, mode="completion", spec=spec)
    correct = total = 0
    for p in pairs:
        ids = tok(p["prompt"] + p["completion"], return_tensors="pt").input_ids[0]
        n_prompt = len(tok(p["prompt"]).input_ids)
        with torch.no_grad():
            pred = model(ids[None]).logits[0].argmax(-1)
        correct += int((pred[n_prompt - 1 : -1] == ids[n_prompt:]).sum())
        total += len(ids) - n_prompt
    assert got == pytest.approx(correct / total, abs=1e-12)


@pytest.mark.parametrize("config_cls", [NeuronAdjustConfig, SelectivePruningConfig])
def test_auto_choice_equals_a_hand_computed_search(setup, config_cls):
    """The curve, the chosen ratio and the selection equal a search written out by hand: fixed-ratio fits on the
    same fit split, each scored by the brute-force accuracy on the held-out split."""
    model, tok, forget, retain = setup
    extra = {"deterministic": True} if config_cls is NeuronAdjustConfig else {}
    config = config_cls(ratio="auto", ratio_grid=GRID, max_retain_drop=0.3, holdout_fraction=0.25, **extra)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    method = unlearned.fit(config, forget, retain, tok, show_progress=False)
    curve = method.ratio_curve

    fit_f, held_f = (reference_split(20, 0.25)[k] for k in (0, 1))
    f_fit, f_held = [forget[i] for i in fit_f], [forget[i] for i in held_f]
    r_fit, r_held = [retain[i] for i in fit_f], [retain[i] for i in held_f]
    base_f, base_r = brute_accuracy(model, tok, f_held), brute_accuracy(model, tok, r_held)
    rows = []
    for r in GRID:
        ref = UnlearnedModelForCausalLM.from_base(model)
        fixed = ref.fit(dataclasses.replace(config, ratio=r), f_fit, r_fit, tok, show_progress=False)
        with torch.no_grad():
            rows.append((r, brute_accuracy(ref, tok, f_held), brute_accuracy(ref, tok, r_held), fixed))
        ref.remove_method(config.method_type)
    assert curve.ratios == [r[0] for r in rows]
    assert curve.base_forget == pytest.approx(base_f) and curve.base_retain == pytest.approx(base_r)
    assert curve.forget_accuracy == pytest.approx([r[1] for r in rows])
    assert curve.retain_accuracy == pytest.approx([r[2] for r in rows])
    ok = [i for i, row in enumerate(rows) if (base_r - row[2]) / base_r <= config.max_retain_drop]
    best = max(ok, key=lambda i: ((base_f - rows[i][1]) / base_f, -i))
    assert curve.chosen == best
    for name in ("layer_index", "neuron_index"):
        assert torch.equal(method.state[name], rows[best][3].state[name])
    assert curve.retain_drop[best] <= config.max_retain_drop


def test_a_truncation_warning_is_given_once_per_data_set(setup, caplog):
    """The held-out examples were tokenized anew at every ratio of the search, repeating the warning (a review)."""
    model, tok, forget, retain = setup
    config = NeuronAdjustConfig(ratio="auto", ratio_grid=GRID, max_retain_drop=0.99, holdout_fraction=0.25)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    with caplog.at_level("WARNING", logger="unlearn_hf"):
        method = unlearned.fit(config, forget, retain, tok, show_progress=False, max_length=8)
    assert len(method.ratio_curve.ratios) == len(GRID)
    warned = [r.getMessage() for r in caplog.records if "longer than max_length=8" in r.getMessage()]
    # one per data set: the fit's forget and retain splits, the held-out forget and retain splits
    expected = []
    for texts in (forget, retain):
        for part in reference_split(20, 0.25):
            expected.append(f"{sum(len(tok(texts[i]).input_ids) > 8 for i in part)} of {len(part)}")
    assert sorted(w.split(" rows")[0] for w in warned) == sorted(expected)


def test_a_budget_no_ratio_meets_fails_with_nothing_attached(setup):
    model, tok, forget, retain = setup
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    hooks = hook_count(model)
    config = SelectivePruningConfig(ratio="auto", ratio_grid=[1.0], max_retain_drop=1e-6)
    # the premise, computed independently: zeroing every key neuron changes the retain predictions
    held = [retain[i] for i in reference_split(20, 0.2)[1]]
    pruned = UnlearnedModelForCausalLM.from_base(model)
    pruned.fit(dataclasses.replace(config, ratio=1.0), forget, retain, tok, show_progress=False)
    assert brute_accuracy(pruned, tok, held) < brute_accuracy(model, tok, held)
    pruned.remove_method("selective_pruning")
    with pytest.raises(RatioSearchError, match="max_retain_drop"):
        unlearned.fit(config, forget, retain, tok, show_progress=False)
    assert not unlearned.methods and hook_count(model) == hooks


def test_auto_refuses_statistics_and_missing_retain(setup):
    model, tok, forget, retain = setup
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    from unlearn_hf import probe

    stats = probe(model, forget, tok, site="pre", show_progress=False)
    with pytest.raises(ValueError, match="not precomputed statistics"):
        unlearned.fit(NeuronAdjustConfig(ratio="auto"), stats, retain, tok, show_progress=False)
    with pytest.raises(ValueError, match="retain data"):
        unlearned.fit(NeuronAdjustConfig(ratio="auto"), forget, None, tok, show_progress=False)
    assert not unlearned.methods


def test_curve_is_saved_loaded_and_validated(setup, tmp_path):
    model, tok, forget, retain = setup
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    config = NeuronAdjustConfig(ratio="auto", ratio_grid=GRID, max_retain_drop=0.3)
    method = unlearned.fit(config, forget, retain, tok, show_progress=False)
    unlearned.save_pretrained(tmp_path / "m", save_base_model=True)
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "m")
    again = loaded.methods["neuron_adjust"]
    assert again.ratio_curve == method.ratio_curve and again.config == config
    # what `unlearn-hf fit` prints: the chosen ratio (it printed the method's name only; a review)
    from unlearn_hf.cli.common import fitted_summary

    chosen = GRID[int(method.state["ratio_chosen"].item())]
    assert fitted_summary(loaded.methods) == f"neuron_adjust (ratio='auto' chose {chosen:g})"
    state = dict(method.state)
    bad = state[CURVE].clone()
    bad[0, 0] = 0.07
    with pytest.raises(ValueError, match="not the start of the config's grid"):
        type(method)(config, {**state, CURVE: bad})
    with pytest.raises(ValueError, match="ratio_chosen"):
        type(method)(config, {**state, "ratio_chosen": torch.tensor([len(GRID)])})
    assert NeuronAdjustConfig(ratio="auto").ratio_grid is None and len(DEFAULT_GRID) >= 5


def test_auto_refuses_a_disable_block_and_tokenizer_batches(setup):
    """Inside ``disable_unlearning()`` the method being measured would be switched off too (every ratio scored no
    drop and the smallest was chosen); a list of tokenizer outputs (``BatchEncoding``, a ``UserDict``) cannot be
    held out: both are refused before anything is probed or attached."""
    model, tok, forget, retain = setup
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    config = SelectivePruningConfig(ratio="auto", ratio_grid=GRID)
    with unlearned.disable_unlearning(), pytest.raises(ValueError, match="disable_unlearning"):
        unlearned.fit(config, forget, retain, tok, show_progress=False)
    batches = [tok(forget[i : i + 2], return_tensors="pt", padding=True) for i in range(0, 10, 2)]
    assert not isinstance(batches[0], dict)
    with pytest.raises(ValueError, match="tokenized batches"):
        unlearned.fit(config, batches, retain, tok, show_progress=False)
    assert not unlearned.methods


def test_a_retain_drop_exactly_at_the_budget_is_within_it(setup, monkeypatch):
    """19 of 20 retain tokens kept is a drop of exactly 5%, which floats compute as 0.05000000000000004."""
    from unlearn_hf.methods import ratio_search

    model, tok, forget, retain = setup
    assert (1.0 - 0.95) / 1.0 > 0.05  # the premise: the float drop lies above the budget
    scores = iter([(0.5, 1.0), (0.4, 0.95)])  # (forget, retain) accuracy before, then at 0.05
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    monkeypatch.setattr(unlearned, "add_method", lambda name, method: None)
    monkeypatch.setattr(unlearned, "remove_method", lambda name: None)
    curve = ratio_search.search_ratio(
        unlearned,
        SelectivePruningConfig(ratio="auto", ratio_grid=[0.05], max_retain_drop=0.05),
        lambda r: None,
        lambda: next(scores),
        label="test",
    )
    assert curve.ratio == 0.05 and curve.chosen == 0


def test_every_ratio_is_scored_when_the_retain_drop_does_not_grow_with_it(setup, monkeypatch):
    """A ratio beyond the budget does not end the search: a larger one may drop retain less (small held-out sets,
    random draws) and forget more. The walk stopped at the first one beyond the budget, so it missed the best ratio
    or found none (a review)."""
    from unlearn_hf.methods import ratio_search

    model, _, _, _ = setup
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    monkeypatch.setattr(unlearned, "add_method", lambda name, method: None)
    monkeypatch.setattr(unlearned, "remove_method", lambda name: None)

    def search(scores, budget):
        scores = iter(scores)
        return ratio_search.search_ratio(
            unlearned,
            SelectivePruningConfig(ratio="auto", ratio_grid=[0.01, 0.1, 0.4], max_retain_drop=budget),
            lambda r: None,
            lambda: next(scores),
            label="test",
        )

    # (forget, retain) accuracy before, then at 0.01, 0.1, 0.4: retain drops 0%, 10.5%, 5.3%
    scores = [(0.5, 0.95), (0.49, 0.95), (0.45, 0.85), (0.4, 0.9)]
    curve = search(scores, 0.06)
    assert curve.ratios == [0.01, 0.1, 0.4] and curve.ratio == 0.4
    assert curve.forget_drop[2] == pytest.approx(0.2) and curve.retain_drop[2] == pytest.approx(0.05 / 0.95)
    # the smallest ratio beyond the budget, a larger one within it
    curve = search([(0.5, 0.95), (0.49, 0.85), (0.45, 0.95), (0.4, 0.5)], 0.06)
    assert curve.ratio == 0.1 and curve.chosen == 1
    # none within: the error names the least drop and its ratio
    with pytest.raises(RatioSearchError, match=r"the least: 0\.053 at ratio 0\.4"):
        search([(0.5, 0.95), (0.49, 0.85), (0.45, 0.8), (0.4, 0.9)], 0.05)


def test_the_fitted_config_records_the_grid_it_searched(setup, tmp_path, monkeypatch):
    """A fit on the default grid saved ratio_grid=None: a later default grid made the checkpoint unloadable (its
    curve no longer matched; a review)."""
    from unlearn_hf.methods import ratio_search

    model, tok, forget, retain = setup
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    config = SelectivePruningConfig(ratio="auto", max_retain_drop=0.9)
    method = unlearned.fit(config, forget, retain, tok, show_progress=False)
    assert config.ratio_grid is None and method.config.ratio_grid == list(DEFAULT_GRID)
    assert method.ratio_curve.ratios == list(DEFAULT_GRID)
    unlearned.save_pretrained(tmp_path / "u", base_model_name_or_path="tiny/llama")
    monkeypatch.setattr(ratio_search, "DEFAULT_GRID", (*DEFAULT_GRID, 0.5))
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "u", base_model=copy.deepcopy(model))
    assert loaded.methods["selective_pruning"].ratio_curve == method.ratio_curve
