"""Key Space Detection on the routed experts of a mixture of experts (``docs/ARCHITECTURES.md``): one hypercube per
expert, a token inside a layer's experts when it is inside the hypercube of every expert it is routed to that has
one. The
decision and the calibration pass against a numpy computation from the router's choices and the raw 3-D weights;
α = 1 containing every fitted query; calibration over dense and routed layers; save/load and generate."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_ksd_formats import QUESTIONS, RETAIN
from test_moe import MOE, moe_model, reference_expert

from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM
from unlearn_hf.data import DataSpec
from unlearn_hf.methods.key_space_detection.distances import trailing_distances
from unlearn_hf.methods.key_space_detection.key_units import RoutedUnit, key_units
from unlearn_hf.sites import find_ffl_sites

ALPHA, WINDOW = 1.3, 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread_here(one_thread):
    """Tiny models run fastest on one thread."""


def rows(seed: int, n: int, lo: int, hi: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(lo, hi, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
        for _ in range(n)
    ]


def left_padded(token_rows: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in token_rows)
    ids = torch.zeros(len(token_rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(token_rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask}


def as_batches(token_rows: list[list[int]], size: int) -> list[dict[str, torch.Tensor]]:
    return [left_padded(token_rows[i : i + size]) for i in range(0, len(token_rows), size)]


def expert_keys(model, block: int, batch) -> tuple[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """By hand, from a plain forward: ``(tokens, {expert: (routed flags [tokens], keys [n_routed, I])})`` of the
    experts of decoder layer ``block``, from the router's choice and the raw 3-D weights."""
    if (
        model.config.model_type == "llama4_text"
    ):  # every expert sees every token, scaled by its routing weight
        moe = model.model.layers[block].feed_forward
        seen = {}
        h = moe.register_forward_pre_hook(
            lambda m, a: seen.update(x=a[0].detach().reshape(-1, a[0].shape[-1]))
        )
        with torch.no_grad():
            model(**batch, use_cache=False)
            h.remove()
            x = seen["x"]
            logits = torch.nn.functional.linear(x, moe.router.weight)
            top = logits.topk(moe.top_k, dim=1).indices
        out = {}
        for e in range(moe.num_experts):
            routed = (top == e).any(-1)
            scaled = (x * torch.sigmoid(logits[:, e : e + 1])).double()[routed]
            gate, up = (scaled @ moe.experts.gate_up_proj[e].detach().double()).chunk(2, dim=-1)
            out[e] = routed.numpy(), (up * torch.nn.functional.silu(gate)).numpy()
        return x.shape[0], out
    experts = next(s.key.owner for s in find_ffl_sites(model) if s.routed and s.decoder_layer == block)
    seen = {}
    h = experts.register_forward_pre_hook(
        lambda m, a: seen.update(x=a[0].detach().double().reshape(-1, a[0].shape[-1]), top=a[1].detach())
    )
    with torch.no_grad():
        model(**batch, use_cache=False)
    h.remove()
    x, top = seen["x"], seen["top"]
    out = {}
    for e in range(experts.num_experts):
        routed = (top == e).any(-1)
        out[e] = routed.numpy(), reference_expert(experts, e, x[routed])[1].numpy()
    return x.shape[0], out


def reference_distances(model, block: int, batch, cubes: dict[int, tuple]) -> np.ndarray:
    """``z`` ``[rows, seq]`` by hand: each routed expert's key (:func:`expert_keys`), ``max_e max_d |v − μ_e| / σ_e /
    k_e`` over its experts with a hypercube (``inf``: none has one)."""
    tokens, keys = expert_keys(model, block, batch)
    z = np.full(tokens, -1.0)
    for e, (routed, key) in keys.items():
        if e in cubes and routed.any():  # an expert without a hypercube has no say
            mu, sd, k = cubes[e]
            z[routed] = np.maximum(z[routed], (np.abs(key - mu) / sd).max(-1) / k)
    z[z < 0] = np.inf
    return z.reshape(batch["input_ids"].shape)


@pytest.mark.parametrize(
    "model_type", ["mixtral", "gpt_oss", "qwen2_moe", "deepseek_v3", "llama4_text", "dbrx"]
)
def test_routed_decision_and_calibration_distances_match_numpy(model_type):
    model = moe_model(model_type)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    sites = unlearned.ffl_sites
    block = 1
    experts = [s for s in sites if s.routed and s.decoder_layer == block]
    fit_rows = rows(0, 4, 3, 64)
    method = unlearned.fit(
        KeySpaceDetectionConfig(
            inputs="prompts", layers=[experts[-1].layer], window=WINDOW, alpha=ALPHA, action="eos"
        ),
        as_batches(fit_rows, 3),
        show_progress=False,
    )
    # naming one expert's site checks its whole layer: the experts with >= 2 fitted queries have hypercubes
    fitted = method.config.layers
    assert set(fitted) <= {s.layer for s in experts} and fitted == method.state["layers"].tolist()
    assert method.state["count"].min() >= 2 and len(fitted) < len(
        experts
    )  # with 4 queries, some expert has none
    cubes = {
        sites[i].expert: tuple(method.state[n][r].numpy() for n in ("center", "scale"))
        + (float(method.state["k"][r]),)
        for r, i in enumerate(fitted)
    }
    test_rows = fit_rows + rows(1, 6, 3, 64) + rows(2, 6, 64, 128)
    batch = left_padded(test_rows)
    z = reference_distances(model, block, batch, cubes)
    real = batch["attention_mask"].bool().numpy()
    expected = []
    for i in range(len(test_rows)):
        pos = np.nonzero(real[i])[0][-WINDOW:]
        finite = z[i, pos][np.isfinite(z[i, pos])]
        assert np.abs(finite / ALPHA - 1).min(initial=1.0) > 1e-4  # nothing at the boundary (float32 keys)
        expected.append(bool((z[i, pos] <= ALPHA).any()))
    assert 0 < sum(expected) < len(test_rows)
    with torch.no_grad():
        assert unlearned.detect(**batch).tolist() == expected
        # one row at a time, without padding: the same decisions
        assert [bool(unlearned.detect(torch.tensor([r]))[0]) for r in test_rows] == expected

    # the calibration pass reads the same distances (its own hooks, its own batches)
    unit = key_units(sites)[experts[0].layer]
    state = method.state
    own = {i: (state["center"][r], state["scale"][r], float(state["k"][r])) for r, i in enumerate(fitted)}
    reader = RoutedUnit([sites[i] for i in unit], own, "cpu")
    queries = [type("Q", (), {"input_ids": r})() for r in test_rows]
    got = trailing_distances(
        model,
        queries,
        sites,
        {unit[0]: reader},
        window=WINDOW,
        pad_id=0,
        spec=DataSpec(batch_size=4),
        show_progress=False,
    )
    for i in range(len(test_rows)):
        pos = np.nonzero(real[i])[0][-WINDOW:][::-1]  # offset 0 = the last token
        np.testing.assert_allclose(got[i, 0, : len(pos)].numpy(), z[i, pos], rtol=1e-4)  # float32 keys


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_alpha_one_contains_every_fitted_query_and_round_trips(model_type, tmp_path):
    unlearned = UnlearnedModelForCausalLM.from_base(moe_model(model_type))
    sites = unlearned.ffl_sites
    routed = [s.layer for s in sites if s.routed]
    fit_rows = rows(3, 16, 3, 64)
    method = unlearned.fit(
        KeySpaceDetectionConfig(inputs="prompts", layers=[routed[0]], window=1, alpha=1.0, action="eos"),
        as_batches(fit_rows, 4),
        show_progress=False,
    )
    n_experts = MOE[model_type][1]
    assert len(method.config.layers) == n_experts  # 16 queries: every expert of the layer got at least 2
    with torch.no_grad():  # in the fit's batches: the same float rounding as the fit's keys
        assert all(unlearned.detect(**b).all() for b in as_batches(fit_rows, 4))
    other = rows(4, 8, 64, 128)
    batch = left_padded(fit_rows[:4] + other)
    with torch.no_grad():
        flags = unlearned.detect(**batch)
    assert flags.any() and not flags[4:].all()
    out = unlearned.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.abstained, flags)
    eos = unlearned.config.eos_token_id
    assert (out.sequences[flags, batch["input_ids"].shape[1]] == eos).all()  # the refusal: end of sequence
    unlearned.save_pretrained(tmp_path / "u", base_model_name_or_path=f"tiny/{model_type}")
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "u", base_model=moe_model(model_type))
    twin = copy.deepcopy(unlearned)
    with torch.no_grad():
        assert torch.equal(loaded.detect(**batch), flags) and torch.equal(twin.detect(**batch), flags)


def test_calibration_chooses_among_dense_and_routed_layers(smol_tokenizer):
    """Calibrated on text (rendered with the chat template): the candidates are every dense site and every routed
    layer, and the choice meets the budget on the calibration data."""
    tok = copy.deepcopy(smol_tokenizer)
    for model_type in ("mixtral", "qwen2_moe"):
        model = moe_model(model_type, vocab_size=len(tok))
        unlearned = UnlearnedModelForCausalLM.from_base(model)
        sites = unlearned.ffl_sites
        method = unlearned.fit(
            KeySpaceDetectionConfig(max_false_rate=0.25, calibration_fraction=0.25),
            QUESTIONS,
            {"other": RETAIN},
            tok,
            show_progress=False,
        )
        units = key_units(sites)
        candidates = method.state["calibration_layers"].tolist()
        assert candidates == sorted(units)  # every dense site and every routed layer (all had hypercubes)
        assert {sites[u].routed for u in candidates} == ({True} if model_type == "mixtral" else {True, False})
        chosen = [u for u, members in units.items() if set(members) & set(method.config.layers)]
        assert chosen and sorted(i for u in chosen for i in units[u] if i in method.config.layers) == (
            method.config.layers
        )
        assert max(method.config.calibration["false_rate"].values()) <= 0.25


def _fitted_mixture(model_type: str, **overrides):
    unlearned = UnlearnedModelForCausalLM.from_base(moe_model(model_type))
    routed = [s.layer for s in unlearned.ffl_sites if s.routed]
    config = dict(
        inputs="prompts", layers=[routed[-1]], window=WINDOW, alpha=ALPHA, action="eos", **overrides
    )
    unlearned.fit(KeySpaceDetectionConfig(**config), as_batches(rows(0, 16, 3, 64), 4), show_progress=False)
    return unlearned


@pytest.mark.parametrize("model_type", ["gpt_oss", "mixtral", "llama4_text"])
def test_rows_that_do_not_abstain_are_the_bare_models_bit_for_bit(model_type):
    """Only reading hooks on the taps: the experts module runs its own forward (its default implementation, not the
    eager loop), and the keys are computed beside it, so every non-abstaining logit is the bare model's."""
    unlearned = _fitted_mixture(model_type)
    bare = moe_model(model_type)
    mixed = left_padded(rows(0, 2, 3, 64) + rows(5, 6, 64, 128))
    with torch.no_grad():
        flags = unlearned.detect(**mixed)
        assert flags[:2].all() and not flags.all()
        # a forward (the prefill): the rows that do not abstain are the bare model's
        keep = ~flags
        assert torch.equal(unlearned(**mixed).logits[keep], bare(**mixed).logits[keep])
        # generate on the rows that do not abstain: every step's logits are the bare model's
        batch = left_padded([r for r, f in zip(rows(0, 2, 3, 64) + rows(5, 6, 64, 128), flags) if not f])
        gen = dict(
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        out, ref = unlearned.generate(**batch, **gen), bare.generate(**batch, **gen)
    assert not out.abstained.any() and torch.equal(out.sequences, ref.sequences)
    for step, (got, want) in enumerate(zip(out.logits, ref.logits)):
        assert torch.equal(got, want), step


def test_threads_sharing_one_model_decide_as_one_thread_does():
    import threading

    unlearned = _fitted_mixture("mixtral")
    batches = [left_padded(rows(0, 6, 3, 64) + rows(4, 10, 64, 128)), left_padded(rows(7, 5, 3, 64))]
    with torch.no_grad():
        expected = [unlearned.detect(**b) for b in batches]
    assert 0 < int(expected[0].sum()) < 16
    failures: list[str] = []

    def worker(batch, want):
        try:
            for _ in range(25):
                with torch.no_grad():
                    got = unlearned.detect(**batch)
                if not torch.equal(got, want):
                    failures.append("a decision differs")
        except Exception as err:  # noqa: BLE001 - collected and asserted on below
            failures.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=worker, args=pair) for pair in zip(batches, expected)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]


def test_bad_layer_choices_are_refused_clearly():
    unlearned = UnlearnedModelForCausalLM.from_base(moe_model("qwen2_moe"))
    data = as_batches(rows(0, 8, 3, 64), 4)
    with pytest.raises(
        ValueError, match=r"different widths \[40, 48\]"
    ):  # the shared expert (48) and experts (40)
        unlearned.fit(
            KeySpaceDetectionConfig(inputs="prompts", layers=[0, 1], action="eos"), data, show_progress=False
        )
    with pytest.raises(ValueError, match="at least 2 forget queries.*for 1"):
        unlearned.fit(
            KeySpaceDetectionConfig(inputs="prompts", layers=[0], action="eos"),
            [left_padded(rows(0, 1, 3, 64))],
            show_progress=False,
        )
    assert not unlearned.methods


def test_several_routed_layers_at_alpha_one_contain_every_fitted_query():
    """The fit reads routed keys as the decision does (the experts' own forward, keys beside it): GPT-OSS's own
    experts forward differs from the eager loop in the last bits, which fed later layers other inputs (23 of 24)."""
    unlearned = UnlearnedModelForCausalLM.from_base(moe_model("gpt_oss", num_hidden_layers=3))
    routed = [s.layer for s in unlearned.ffl_sites if s.routed]
    fit_rows = as_batches(rows(1, 24, 3, 64), 4)
    config = dict(
        inputs="prompts", layers=[routed[0], routed[4], routed[8]], window=1, alpha=1.0, action="eos"
    )
    unlearned.fit(KeySpaceDetectionConfig(**config), fit_rows, show_progress=False)
    with torch.no_grad():
        assert all(bool(unlearned.detect(**b).all()) for b in fit_rows)
