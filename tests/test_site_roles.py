"""Sites per method: a fused gate/up projection split by the library (hand-computed gate halves, every layout, the
layout in the fingerprint; Neuron Adjust on the gate half only is checked for every fused type in
test_architectures), and layers with a key site only (Key Space Detection and Selective Pruning work, Neuron Adjust
is refused with the reason)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers_na import token_batches
from tiny_models import hook_count, tiny_model
from torch import nn

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
)
from unlearn_hf.persistence import FingerprintMismatchError
from unlearn_hf.sites import GATE_LAYOUTS, SiteError, find_ffl_sites

#: token id ranges of the "skills" inside the tiny models' 128-token vocabulary
FORGET, RETAIN = dict(lo=3, hi=64), dict(lo=64, hi=128)


def _phi3():
    return tiny_model("phi3")


def _batches(seed, spec, n=2):
    return token_batches(seed, **{**spec, "n": n})


class _Interleaved(nn.Module):
    """A gated FFL whose fused projection stores the gate at even columns, or in the second half."""

    def __init__(self, hidden: int, d_ff: int, layout: str) -> None:
        super().__init__()
        self.w_in = nn.Linear(hidden, 2 * d_ff, bias=False)
        self.w_out = nn.Linear(d_ff, hidden, bias=False)
        self.layout, self.d_ff = layout, d_ff

    def forward(self, x):
        h = self.w_in(x)
        if self.layout == "even":
            gate, up = h[..., 0::2], h[..., 1::2]
        else:
            up, gate = h.chunk(2, dim=-1)
        return self.w_out(nn.functional.silu(gate) * up)


@pytest.mark.parametrize("model_type", ["phi3", "glm", "glm4"])
def test_table_fused_sites_give_the_hand_computed_gate(model_type):
    model = tiny_model(model_type)
    sites = find_ffl_sites(model)
    assert [(s.pre_name, s.gate, s.d_ff) for s in sites] == [
        (f"model.layers.{i}.mlp.gate_up_proj", "first_half", 80) for i in range(2)
    ]
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    for s in sites:
        w = s.pre.weight.detach().double()
        out = x @ w.T
        torch.testing.assert_close(s.pre_activation(out), x @ w[:80].T)  # gate = the first 80 rows of W


@pytest.mark.parametrize("layout", ["even", "second_half"])
def test_discovery_verifies_the_fused_layout_on_the_layer(layout, caplog):
    model = tiny_model("llama")
    model.config.model_type = "my_fused_arch"
    for layer in model.model.layers:
        layer.mlp = _Interleaved(32, 80, layout)
    with caplog.at_level(logging.INFO, logger="unlearn_hf.sites"):
        sites = find_ffl_sites(model)
    assert [(s.pre_name, s.gate) for s in sites] == [(f"model.layers.{i}.mlp.w_in", layout) for i in range(2)]
    # the table layout of Phi-3 is found by discovery too
    phi = _phi3()
    phi.config.model_type = "my_fused_arch"
    assert [s.gate for s in find_ffl_sites(phi)] == ["first_half", "first_half"]


def test_fused_layout_that_cannot_be_verified_leaves_key_sites(caplog):
    phi = _phi3()
    phi.config.model_type = "my_fused_arch"
    for (
        layer
    ) in phi.model.layers:  # neither the config's activation nor a common one: no layout reproduces it
        layer.mlp.activation_fn = nn.Tanh()
    with caplog.at_level(logging.WARNING, logger="unlearn_hf.sites"):
        sites = find_ffl_sites(phi)
    assert all(s.pre is None and s.key_name.endswith("mlp.down_proj") for s in sites)
    assert "gate_up_proj computes gate and up in one fused projection" in sites[0].pre_missing
    assert "'gate'" in sites[0].pre_missing and "key sites only" in caplog.text
    # the override names the layout
    named = find_ffl_sites(phi, {"pre": "mlp.gate_up_proj", "key": "mlp.down_proj", "gate": "first_half"})
    assert [s.gate for s in named] == ["first_half", "first_half"]


def test_override_gate_errors():
    phi = _phi3()
    with pytest.raises(SiteError, match="gate layout 'middle'"):
        find_ffl_sites(phi, {"pre": "mlp.gate_up_proj", "key": "mlp.down_proj", "gate": "middle"})
    with pytest.raises(SiteError, match="'gate' layout needs the fused projection under 'pre'"):
        find_ffl_sites(phi, {"key": "mlp.down_proj", "gate": "first_half"})
    with pytest.raises(SiteError, match=r"expected h->2\*d_ff \(fused gate/up\)"):
        find_ffl_sites(tiny_model("llama"), {"pre": "mlp.gate_proj", "key": "mlp.down_proj", "gate": "even"})
    assert set(GATE_LAYOUTS) == {"first_half", "second_half", "even"}


def test_fused_sites_save_load_and_fingerprint(tmp_path):
    unlearned = UnlearnedModelForCausalLM.from_base(_phi3())
    unlearned.fit(
        NeuronAdjustConfig(ratio=0.2, deterministic=True),
        _batches(0, FORGET),
        _batches(1, RETAIN),
        show_progress=False,
    )
    unlearned.save_pretrained(tmp_path / "u", base_model_name_or_path="tiny/phi3")
    batch = _batches(2, FORGET, n=1)[0]
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "u", base_model=_phi3())
    with torch.no_grad():
        assert torch.equal(unlearned(**batch).logits, loaded(**batch).logits)
    saved = json.loads((tmp_path / "u" / "unlearn_config.json").read_text())
    assert [s["gate"] for s in saved["base_model"]["fingerprint"]["ffl_sites"]] == ["first_half"] * 2
    # the same weights read with another layout are another model
    other = _phi3()
    with pytest.raises(
        FingerprintMismatchError, match="layer 0 FFL gate layout: saved 'first_half', model has 'even'"
    ):
        UnlearnedModelForCausalLM.from_pretrained(
            tmp_path / "u",
            base_model=UnlearnedModelForCausalLM.from_base(
                other, sites={"pre": "mlp.gate_up_proj", "key": "mlp.down_proj", "gate": "even"}
            ),
        )


class _W123(nn.Module):
    """``w2(tanh(w1 x) * w3 x)``: w1 and w3 cannot be told apart by their names or shapes, nor by the computation
    (tanh is neither the config's activation nor a common one that discovery tries)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x):
        return self.w2(torch.tanh(self.w1(x)) * self.w3(x))


def _key_only_llama():
    model = tiny_model("llama")
    model.config.model_type = "my_new_arch"
    for layer in model.model.layers:
        layer.mlp = _W123(layer.mlp)
    return model


def test_key_only_model_gets_ksd_and_sp_and_refuses_na_with_the_reason():
    model = _key_only_llama()
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    assert all(s.pre is None for s in unlearned.ffl_sites)
    with pytest.raises(SiteError, match=r"NeuronAdjust needs the FFL pre-activation site.*mlp\.w1, mlp\.w3"):
        unlearned.fit(
            NeuronAdjustConfig(ratio=0.1), _batches(0, FORGET), _batches(1, RETAIN), show_progress=False
        )
    assert not unlearned.methods and hook_count(model) == 0
    sp = unlearned.fit(
        SelectivePruningConfig(ratio=0.1), _batches(0, FORGET), _batches(1, RETAIN), show_progress=False
    )
    assert sp.state["layer_index"].numel() > 0
    forget = _batches(0, FORGET, n=1)
    unlearned.fit(
        KeySpaceDetectionConfig(inputs="prompts", layers=[1], alpha=1.0, window=1, action="eos"),
        forget,
        name="ksd",
        show_progress=False,
    )
    with torch.no_grad():
        assert unlearned.detect(**forget[0]).all()


def test_one_fit_call_with_several_methods_on_key_only_layers():
    """A shared probe pass spans the layers of every method: it reads pre-activations only where they exist."""
    ksd = KeySpaceDetectionConfig(inputs="prompts", alpha=1.0, window=1, action="eos")
    model = _key_only_llama()
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    with pytest.raises(SiteError, match="NeuronAdjust needs the FFL pre-activation site"):
        unlearned.fit(
            [ksd, NeuronAdjustConfig(ratio=0.1)],
            _batches(0, FORGET),
            _batches(1, RETAIN),
            show_progress=False,
        )
    assert not unlearned.methods and hook_count(model) == 0

    def mixed(model):  # layer 0: key only; layer 1: both sites
        layers = model.model.layers
        return [(None, layers[0].mlp.down_proj), (layers[1].mlp.gate_proj, layers[1].mlp.down_proj)]

    together = UnlearnedModelForCausalLM.from_base(tiny_model("llama"), sites=mixed)
    together.fit(
        [ksd, NeuronAdjustConfig(ratio=0.1, layers=[1])],
        _batches(0, FORGET),
        _batches(1, RETAIN),
        show_progress=False,
    )
    apart = UnlearnedModelForCausalLM.from_base(tiny_model("llama"), sites=mixed)
    apart.fit(ksd, _batches(0, FORGET), show_progress=False)
    apart.fit(
        NeuronAdjustConfig(ratio=0.1, layers=[1]),
        _batches(0, FORGET),
        _batches(1, RETAIN),
        show_progress=False,
    )
    for a, b in zip(together.methods.values(), apart.methods.values()):
        assert a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_discovery_finds_the_fused_layout_in_half_precision(dtype):
    phi = _phi3().to(dtype)
    phi.config.model_type = "my_fused_arch"
    assert [s.gate for s in find_ffl_sites(phi)] == ["first_half", "first_half"]
