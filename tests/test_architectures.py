"""Every architecture of the tiny-model matrix (``tiny_models.TINY_MODEL_TYPES``: dense and fused gate/up FFLs; and
``DISCOVERED_MODEL_TYPES``, outside the table, whose sites discovery finds) through every method: Key Space Detection at α = 1 contains every fitted query, Neuron Adjust changes only its
selected neurons (by METHOD.md's formula, in numpy), generate runs and abstains, and save/load round-trips.
The sites themselves are checked against hand-computed activations in test_sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_na import token_batches
from tiny_models import (
    DISCOVERED_MODEL_TYPES,
    TINY_MODEL_TYPES,
    small_text_kwargs,
    tiny_model,
    tiny_tokenizer,
)

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
)

#: token id ranges of the "skills" inside the tiny models' 128-token vocabulary
FORGET, RETAIN = dict(lo=3, hi=64), dict(lo=64, hi=128)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_here(one_thread):
    """Tiny models run fastest on one thread."""


def _rows(seed: int, spec: dict, n: int = 6) -> list[dict[str, torch.Tensor]]:
    """``n`` single unpadded rows of 3..9 random ids: the fit and the checks see the same shapes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 10, (1,), generator=g))
        ids = torch.randint(spec["lo"], spec["hi"], (1, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _ksd(**overrides) -> KeySpaceDetectionConfig:
    return KeySpaceDetectionConfig(
        **{"inputs": "prompts", "layers": [-1], "alpha": 1.0, "window": 1, **overrides}
    )


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES + DISCOVERED_MODEL_TYPES)
def test_ksd_at_alpha_one_contains_every_fitted_query(model_type):
    unlearned = UnlearnedModelForCausalLM.from_base(tiny_model(model_type))
    forget = _rows(0, FORGET)
    unlearned.fit(_ksd(action="eos"), forget, show_progress=False, batch_size=1)
    with torch.no_grad():
        inside = [bool(unlearned.detect(**row)[0]) for row in forget]
    assert inside == [True] * len(forget)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES + DISCOVERED_MODEL_TYPES)
def test_neuron_adjust_changes_only_its_selected_neurons(model_type):
    unlearned = UnlearnedModelForCausalLM.from_base(tiny_model(model_type))
    sites = unlearned.ffl_sites
    raw: dict[int, torch.Tensor] = {}
    handles = [  # registered before Neuron Adjust's hooks, so they see what the module computed
        s.pre.register_forward_hook(lambda m, a, o, i=s.layer: raw.__setitem__(i, o.detach().clone()))
        for s in sites
    ]
    na = unlearned.fit(
        NeuronAdjustConfig(ratio=0.2, deterministic=True),
        token_batches(0, **FORGET, n=2),
        token_batches(1, **RETAIN, n=2),
        show_progress=False,
    )
    used: dict[int, torch.Tensor] = {}
    handles += [  # registered after: they see what the FFL goes on with
        s.pre.register_forward_hook(lambda m, a, o, i=s.layer: used.__setitem__(i, o.detach().clone()))
        for s in sites
    ]
    try:
        with torch.no_grad():
            unlearned(**token_batches(2, **FORGET, n=1)[0])
    finally:
        for h in handles:
            h.remove()
    state = {k: v.double().numpy() for k, v in na.state.items()}
    changed = 0
    for s in sites:
        x, y = raw[s.layer].double(), used[s.layer].double()
        if s.gate is not None:  # the up half of a fused projection is never touched
            up = torch.ones(x.shape[-1], dtype=torch.bool)
            s.pre_activation(up).fill_(False)
            assert int(up.sum()) == s.d_ff
            np.testing.assert_array_equal(y[..., up].numpy(), x[..., up].numpy())
        g, h = s.pre_activation(x).numpy(), s.pre_activation(y).numpy()
        pos = state["layer_index"] == s.layer
        neurons = state["neuron_index"][pos].astype(int)
        others = np.setdiff1d(np.arange(s.d_ff), neurons)
        np.testing.assert_array_equal(h[..., others], g[..., others])
        # METHOD.md §3, deterministic mode: mirror where the forget density is the larger
        v = g[..., neurons]
        mf, sf, mr, sr = (state[n][pos] for n in ("forget_mean", "forget_std", "retain_mean", "retain_std"))
        log_pf = -0.5 * ((v - mf) / sf) ** 2 - np.log(sf)
        log_pr = -0.5 * ((v - mr) / sr) ** 2 - np.log(sr)
        expected = np.where(log_pf > log_pr, mr - (v - mf) / sf * sr, v)
        np.testing.assert_allclose(h[..., neurons], expected, rtol=1e-4, atol=1e-5)
        changed += int((h[..., neurons] != v).sum())
    assert changed > 0


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES + DISCOVERED_MODEL_TYPES)
def test_generate_abstains_and_save_load_round_trips(model_type, tmp_path):
    tok = tiny_tokenizer()
    unlearned = UnlearnedModelForCausalLM.from_base(tiny_model(model_type))
    forget, retain = _rows(0, FORGET), _rows(1, RETAIN)
    unlearned.fit(NeuronAdjustConfig(ratio=0.1, seed=3), forget, retain, name="na", show_progress=False)
    unlearned.fit(SelectivePruningConfig(ratio=0.05), forget, retain, name="sp", show_progress=False)
    unlearned.fit(_ksd(refusal="no"), forget, tokenizer=tok, name="ksd", show_progress=False, batch_size=1)
    refusal = tok("no", add_special_tokens=False)["input_ids"]

    def run(model):
        out = {}
        for name, row in (("forget", forget[0]), ("other", retain[0])):
            with torch.no_grad():
                out[name + "_logits"] = model(**row).logits
                gen = model.generate(
                    **row, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0
                )
            out[name + "_sequences"], out[name + "_abstained"] = gen.sequences, gen["abstained"]
        return out

    before = run(unlearned)
    n = forget[0]["input_ids"].shape[1]
    assert before["forget_abstained"].tolist() == [True]
    assert before["forget_sequences"][0, n : n + len(refusal)].tolist() == refusal
    assert before["other_abstained"].tolist() == [unlearned.detect(**retain[0]).item()]

    unlearned.save_pretrained(tmp_path / "u", base_model_name_or_path=f"tiny/{model_type}")
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "u", base_model=tiny_model(model_type))
    assert list(loaded.methods) == ["na", "sp", "ksd"]
    after = run(loaded)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def _kv_shared_model(model_type: str, **extra):
    """A 4-layer Gemma 4 / Gemma 3n whose last 2 layers reuse earlier layers' keys and values."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        **small_text_kwargs(
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
            num_kv_shared_layers=2,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=128,
            sliding_window=16,
            **extra,
        ),
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _positions_when_generating(unlearned, row) -> dict[int, int]:
    """``{layer: positions its key site runs over}`` in a forward as generate's prefill runs it (logits_to_keep=1)."""
    seen: dict[int, int] = {}
    handles = [
        s.key.register_forward_pre_hook(lambda m, a, i=s.layer: seen.__setitem__(i, a[0].shape[-2]))
        for s in unlearned.ffl_sites
    ]
    try:
        with torch.no_grad():
            unlearned(**row, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_gemma3n_layers_with_activation_sparsity_have_no_pre_activation_site():
    """A Gemma 3n layer with activation sparsity cuts its gate at a Gaussian quantile before the activation: the
    gate projection's output is not what enters it, so Neuron Adjust read and shifted the wrong values there, and
    the recomputed cut-off moved neurons it never selected (a review: 75 of 80 changed neurons not selected). Such
    a layer has no pre-activation site (Neuron Adjust refused, naming it); the others keep theirs, and Neuron
    Adjust there changes, at the activation's input, exactly the neurons it selected."""
    from accelerate import cpu_offload

    def sparse_model():
        return _kv_shared_model(
            "gemma3n_text", laurel_rank=8, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]
        )

    offloaded = sparse_model()  # its weights on "meta": the same sites (the layer's flag, not a run, tells)
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    model = sparse_model()
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    sites = unlearned.ffl_sites
    from unlearn_hf.sites import find_ffl_sites

    for found in (sites, find_ffl_sites(offloaded)):
        assert found[0].pre is None and "sparsifies the gate" in found[0].pre_missing
        assert [s.pre_name for s in found[1:]] == [f"model.layers.{i}.mlp.gate_proj" for i in (1, 2, 3)]
    forget, retain = _rows(0, FORGET), _rows(1, RETAIN)
    with pytest.raises(
        ValueError, match=r"layers \[0\] do not have: layer 0 \(mlp\): it sparsifies the gate"
    ):
        unlearned.fit(NeuronAdjustConfig(ratio=0.2, deterministic=True), forget, retain, show_progress=False)
    assert not unlearned.methods
    mlp = model.model.layers[1].mlp
    seen = []
    handle = mlp.act_fn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        na = unlearned.fit(
            NeuronAdjustConfig(ratio=0.2, deterministic=True, layers=[1]), forget, retain, show_progress=False
        )
        with torch.no_grad():
            unlearned(**forget[0])
            with unlearned.disable_unlearning():
                unlearned(**forget[0])
    finally:
        handle.remove()
    changed = (seen[0] != seen[1]).flatten(0, -2).any(0).nonzero().flatten().tolist()
    assert changed and changed == sorted(na.state["neuron_index"].tolist())


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("bitnet", {}),  # a norm between act(gate) * up and the down projection
        (  # the gate scaled by a positive constant before the activation (a published checkpoint's multipliers)
            "falcon_h1",
            dict(
                head_dim=8,
                mamba_d_ssm=32,
                mamba_n_heads=4,
                mamba_d_head=8,
                mamba_d_state=8,
                mamba_n_groups=1,
                mlp_multipliers=[0.8838834764831844, 0.5859375],
            ),
        ),
    ],
)
def test_a_gate_that_enters_the_activation_keeps_its_site(model_type, extra):
    """A check of this stop's first mend (act(gate) * up had to give the key input) took these layers' sites away,
    though their gate's output is what enters the activation, up to a positive scale that Neuron Adjust's z-scores
    do not see (a review); only a layer that sparsifies its gate loses its site."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from unlearn_hf.sites import find_ffl_sites

    config = AutoConfig.for_model(model_type, **small_text_kwargs(num_hidden_layers=2, **extra))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    container = {"bitnet": "mlp", "falcon_h1": "feed_forward"}[model_type]
    assert [s.pre_name for s in find_ffl_sites(model)] == [
        f"model.layers.{i}.{container}.gate_proj" for i in (0, 1)
    ]


def test_ksd_never_decides_at_layers_that_generate_runs_over_the_last_position_only():
    """The default KSD layer of a Gemma 4 with KV-shared layers was one of them: the fit saw every position, and
    every detect / generate then failed (the layer ran over 1 of 7 positions; a review)."""
    unlearned = UnlearnedModelForCausalLM.from_base(
        _kv_shared_model("gemma4_text", use_double_wide_mlp=False)
    )
    forget = _rows(0, FORGET)
    n = forget[0]["input_ids"].shape[1]
    # the premise, measured: layers 2 and 3 see the last position only
    assert _positions_when_generating(unlearned, forget[0]) == {0: n, 1: n, 2: 1, 3: 1}
    method = unlearned.fit(_ksd(layers="auto", action="eos"), forget, show_progress=False, batch_size=1)
    assert method.config.layers == [1]  # the middle of the layers that can decide
    with torch.no_grad():
        gen = unlearned.generate(**forget[0], max_new_tokens=2, return_dict_in_generate=True, pad_token_id=0)
        assert gen["abstained"].tolist() == [True] and bool(unlearned.detect(**forget[0])[0])
    unlearned.remove_method("key_space_detection")
    with pytest.raises(ValueError, match=r"layers \[3\] run over the last position only"):
        unlearned.fit(_ksd(layers=[3], action="eos"), forget, show_progress=False, batch_size=1)
    assert not unlearned.methods


def test_gemma3n_keeps_its_kv_shared_layers_for_ksd():
    """Gemma 3n shares keys and values too (config num_kv_shared_layers) but runs those layers over every position:
    they stay candidates (the first version of the rule above cut them; a review)."""
    from unlearn_hf.methods.key_space_detection.key_units import key_units, units_cut_by_generate

    model = _kv_shared_model("gemma3n_text", laurel_rank=8, activation_sparsity_pattern=[0.0] * 4)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    forget = _rows(0, FORGET)
    # the premise, measured: every layer runs over every position when generating
    assert set(_positions_when_generating(unlearned, forget[0]).values()) == {forget[0]["input_ids"].shape[1]}
    sites = unlearned.ffl_sites
    assert units_cut_by_generate(unlearned, sites, key_units(sites)) == []
    unlearned.fit(_ksd(layers=[3], action="eos"), forget, show_progress=False, batch_size=1)
