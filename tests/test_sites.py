"""FFL sites on every dense architecture: names, hand-computed pre-activations/keys, discovery, errors, probe."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_MODEL_TYPES, tiny_config, tiny_model, tiny_tokenizer
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from unlearn_hf.data import DataSpec
from unlearn_hf.probe import probe
from unlearn_hf.sites import (
    KNOWN_SITES,
    SiteError,
    as_token_grid,
    config_d_ff,
    find_decoder_layers,
    find_ffl_sites,
    linear_io,
    module_device,
)
from unlearn_hf.sites.model_config import expert_count

# -- the independent reference: where each architecture's FFL lives and what it computes ------------------------

_GATED = ("mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_FAMILY = (
    "llama mistral ministral qwen2 qwen3 gemma gemma2 gemma3_text stablelm olmo olmo2 olmo3 granite cohere "
    "smollm3 helium exaone4 seed_oss cohere2 diffllama doge ernie4_5 exaone hyperclovax internlm3 cwm "
    "ministral3 vaultgemma qwen3_5_text flint beam iquestcoder"
).split()
#: fused gate/up projections: the first half of the output enters the activation, the second multiplies it
_FUSED = {
    t: ("model.layers", "mlp", "mlp.gate_up_proj", None, "mlp.down_proj") for t in ("phi3", "glm", "glm4")
}
_FUSED["modernbert-decoder"] = ("model.layers", "mlp", "mlp.Wi", None, "mlp.Wo")
#: types whose gate only the table names (their two input projections have no telling names)
#: model_type -> (layer list, module whose input is the FFL input x, pre-activation, up (gated) or None, key).
REFERENCE: dict[str, tuple[str, str, str, str | None, str]] = {
    **{t: ("model.layers", *_GATED) for t in _LLAMA_FAMILY},
    "starcoder2": ("model.layers", "mlp", "mlp.c_fc", None, "mlp.c_proj"),
    "nemotron": ("model.layers", "mlp", "mlp.up_proj", None, "mlp.down_proj"),
    "arcee": ("model.layers", "mlp", "mlp.up_proj", None, "mlp.down_proj"),
    "phi": ("model.layers", "mlp", "mlp.fc1", None, "mlp.fc2"),
    "persimmon": ("model.layers", "mlp", "mlp.dense_h_to_4h", None, "mlp.dense_4h_to_h"),
    "gpt_neox": ("gpt_neox.layers", "mlp", "mlp.dense_h_to_4h", None, "mlp.dense_4h_to_h"),
    "falcon": ("transformer.h", "mlp", "mlp.dense_h_to_4h", None, "mlp.dense_4h_to_h"),
    "bloom": ("transformer.h", "mlp", "mlp.dense_h_to_4h", None, "mlp.dense_4h_to_h"),
    "gpt2": ("transformer.h", "mlp", "mlp.c_fc", None, "mlp.c_proj"),
    "gpt_bigcode": ("transformer.h", "mlp", "mlp.c_fc", None, "mlp.c_proj"),
    "gpt_neo": ("transformer.h", "mlp", "mlp.c_fc", None, "mlp.c_proj"),
    "gptj": ("transformer.h", "mlp", "mlp.fc_in", None, "mlp.fc_out"),
    "codegen": ("transformer.h", "mlp", "mlp.fc_in", None, "mlp.fc_out"),
    "mpt": ("transformer.blocks", "ffn", "ffn.up_proj", None, "ffn.down_proj"),
    "opt": ("model.decoder.layers", "fc1", "fc1", None, "fc2"),
    "xglm": ("model.layers", "fc1", "fc1", None, "fc2"),
    "biogpt": ("biogpt.layers", "fc1", "fc1", None, "fc2"),
    "lfm2": ("model.layers", "feed_forward", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2"),
    "nanochat": ("model.layers", "mlp", "mlp.fc1", None, "mlp.fc2"),
    "openai-gpt": ("transformer.h", "mlp", "mlp.c_fc", None, "mlp.c_proj"),
    "jais2": ("model.layers", "mlp", "mlp.up_proj", None, "mlp.down_proj"),
    **_FUSED,
}
_REQUIRED = (
    "llama mistral qwen2 qwen3 gemma gemma2 phi gpt2 gpt_neox opt bloom gptj gpt_bigcode mpt stablelm olmo "
    "starcoder2 codegen gemma3_text olmo2 granite cohere gpt_neo persimmon xglm"
).split()


def _bloom_gelu(x: torch.Tensor) -> torch.Tensor:  # BLOOM's tanh approximation, written out
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _erf_gelu(x: torch.Tensor) -> torch.Tensor:  # MPT: exact GELU
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def activation(model_type: str, config):
    """The FFL activation of ``model_type``, looked up from the config (not from the model's modules)."""
    if model_type == "bloom":
        return _bloom_gelu
    if model_type == "mpt":
        return _erf_gelu
    if model_type == "lfm2":  # Lfm2MLP calls F.silu, whatever the config says
        return torch.nn.functional.silu
    if model_type == "openai-gpt":  # modeling_openai's ACT_FNS maps afn "gelu" to the tanh approximation
        return ACT2FN["gelu_new"]
    for attr in ("hidden_activation", "activation_function", "activation", "hidden_act", "afn"):
        name = getattr(config, attr, None)
        if isinstance(name, str):
            return ACT2FN[name]
    raise AssertionError(f"No activation in the config of {model_type}")


def linear64(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ W^T + b`` in float64 from the raw weights (GPT-2's ``Conv1D`` stores W as ``[in, out]``)."""
    w = module.weight.detach().double()
    w = w if isinstance(module, Conv1D) else w.T
    out = x.double() @ w
    return out if module.bias is None else out + module.bias.detach().double()


def hand_sites(model_type: str, model: nn.Module, layer: int, x: torch.Tensor):
    """Pre-activation and key of one layer computed by hand from the FFL input ``x``."""
    layers, _, pre_name, up_name, _ = REFERENCE[model_type]
    block = model.get_submodule(f"{layers}.{layer}")
    pre = linear64(block.get_submodule(pre_name), x)
    if model_type in _FUSED:
        gate, up = pre.chunk(2, dim=-1)
        return pre, activation(model_type, model.config)(gate) * up
    key = activation(model_type, model.config)(pre)
    if up_name is not None:
        key = key * linear64(block.get_submodule(up_name), x)
    return pre, key


def capture(model: nn.Module, model_type: str, sites, input_ids: torch.Tensor):
    """Run ``input_ids`` (one unpadded row) and capture per layer: FFL input x, site.pre output, site.key input."""
    layers, x_at = REFERENCE[model_type][:2]
    got: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def keep(kind, i, t):
        got[(kind, i)] = t.detach().clone()

    for s in sites:
        block = model.get_submodule(f"{layers}.{s.layer}")
        handles.append(
            block.get_submodule(x_at).register_forward_pre_hook(
                lambda m, a, kw, i=s.layer: keep("x", i, a[0] if a else kw["hidden_states"]), with_kwargs=True
            )
        )
        handles.append(s.pre.register_forward_hook(lambda m, a, out, i=s.layer: keep("pre", i, out)))
        handles.append(s.key.register_forward_pre_hook(lambda m, a, i=s.layer: keep("key", i, a[0])))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


TEXTS = [
    "def add(a, b):\n    return a + b",
    "The capital of France is Paris.",
    "2 + 2 = 4",
    "Bonjour, comment allez-vous aujourd'hui ?\nTres bien.",
    "x",
]


def test_matrix_covers_the_required_architectures():
    assert set(_REQUIRED) <= set(TINY_MODEL_TYPES)
    assert set(TINY_MODEL_TYPES) == set(REFERENCE) == set(KNOWN_SITES)  # every table row is tested
    assert len(TINY_MODEL_TYPES) >= 45


def test_architectures_doc_lists_the_table_exactly():
    doc = (Path(__file__).parent.parent / "docs" / "ARCHITECTURES.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in KNOWN_SITES:
            rows[cells[0]] = tuple(c for c in cells[1:4] if c != "—")
    assert rows == {t: tuple(v) for t, v in KNOWN_SITES.items()}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_here(one_thread):
    """Tiny models run fastest on one thread (several spin against each other on a shared machine)."""


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_sites_match_hand_computation_and_probe(model_type, tokenizer):
    model = tiny_model(model_type)
    layers, _, pre_name, _, key_name = REFERENCE[model_type]
    sites = find_ffl_sites(model)
    n_layers = len(model.get_submodule(layers))
    assert [s.layer for s in sites] == list(range(n_layers))
    for s in sites:
        assert (s.pre_name, s.key_name) == (
            f"{layers}.{s.layer}.{pre_name}",
            f"{layers}.{s.layer}.{key_name}",
        )
        assert s.pre is model.get_submodule(s.pre_name) and s.key is model.get_submodule(s.key_name)

    # the hooked tensors equal an independent computation from the FFL input, token by token
    captured = {(kind, s.layer): [] for kind in ("pre", "key") for s in sites}
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        assert (ids != tokenizer.unk_token_id).all()
        got = capture(model, model_type, sites, ids)
        for s in sites:
            x = got[("x", s.layer)]
            pre, key = hand_sites(model_type, model, s.layer, x)
            torch.testing.assert_close(got[("pre", s.layer)].double(), pre, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[("key", s.layer)].double(), key, rtol=1e-5, atol=1e-5)
            for kind in ("pre", "key"):
                value = got[(kind, s.layer)]
                if (
                    kind == "pre" and model_type in _FUSED
                ):  # the probe reads the gate half: checked by hand here
                    assert s.gate == "first_half"
                    value = value[..., : value.shape[-1] // 2]
                t = as_token_grid(value, ids.shape[1])
                assert t.shape == (1, ids.shape[1], s.d_ff)
                captured[(kind, s.layer)].append(t[0].double().numpy())

    # the streaming probe (padded batches of 2) gives the float64 statistics of the captured tensors
    result = probe(
        model, TEXTS, tokenizer, site=("pre", "key"), spec=DataSpec(batch_size=2), show_progress=False
    )
    for kind in ("pre", "key"):
        for s in sites:
            values = np.concatenate(captured[(kind, s.layer)])
            stats = result[kind].layers[s.layer]
            assert stats.count == values.shape[0]
            np.testing.assert_allclose(stats.mean.numpy(), values.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(stats.variance.numpy(), values.var(0, ddof=1), rtol=1e-4, atol=1e-6)


def _padded(rows: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, span], mask[i, span] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_probe_is_the_same_for_either_padding_side(model_type):
    """METHOD.md §2: padding is excluded, so left padding (absolute position embeddings: GPT-2, GPT-Neo, XGLM,
    BioGPT...) must not shift the statistics away from those of unpadded rows."""
    model = tiny_model(model_type)
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 128, (n,), generator=gen) for n in (9, 4, 6)]
    sites = find_ffl_sites(model)
    single = probe(
        model,
        [{"input_ids": r[None], "attention_mask": torch.ones(1, len(r), dtype=torch.long)} for r in rows],
        site=("pre", "key"),
        sites=sites,
        show_progress=False,
    )
    for side in ("right", "left"):
        padded = probe(model, [_padded(rows, side)], site=("pre", "key"), sites=sites, show_progress=False)
        for kind in ("pre", "key"):
            for s in sites:
                a, b = padded[kind].layers[s.layer], single[kind].layers[s.layer]
                assert a.count == b.count == 19
                torch.testing.assert_close(
                    a.mean, b.mean, rtol=1e-5, atol=1e-6, msg=f"{side} padding, {kind}"
                )
                torch.testing.assert_close(a.variance, b.variance, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_discovery_on_unknown_model_type_finds_the_table_sites(model_type, caplog):
    model = tiny_model(model_type)
    expected = [(s.pre_name, s.key_name, s.d_ff, s.gate) for s in find_ffl_sites(model)]
    model.config.model_type = "my_new_arch"
    with caplog.at_level(logging.INFO, logger="unlearn_hf.sites"):
        found = find_ffl_sites(model)
    assert "Discovered FFL sites" in caplog.text
    assert [(s.pre_name, s.key_name, s.d_ff, s.gate) for s in found] == expected


@pytest.mark.parametrize(
    "model_type, pre, key, d_ff, gate",
    [  # the FFL container beside a state-space / recurrent block: searched alone (both were refused, a review)
        ("granitemoehybrid", "shared_mlp.input_linear", "shared_mlp.output_linear", 48, "first_half"),
        ("recurrent_gemma", "mlp_block.gate_proj", "mlp_block.down_proj", 40, None),  # half the config's 80
    ],
)
def test_discovery_finds_the_ffl_container_beside_a_state_space_block(model_type, pre, key, d_ff, gate):
    sites = find_ffl_sites(tiny_model(model_type))
    assert [(s.pre_name, s.key_name, s.d_ff, s.gate) for s in sites] == [
        (f"model.layers.{i}.{pre}", f"model.layers.{i}.{key}", d_ff, gate) for i in range(2)
    ]


def test_gated_discovery_uses_gate_not_up():
    model = tiny_model("llama")
    model.config.model_type = "my_new_arch"
    sites = find_ffl_sites(model)
    assert [s.pre_name for s in sites] == [f"model.layers.{i}.mlp.gate_proj" for i in range(2)]
    assert [s.key_name for s in sites] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]


class _StackedExperts(nn.Module):
    """DBRX's layout: a router, and every expert's weights stacked in one ``[experts * d_ff, hidden]`` parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(32, 4)
        self.w1, self.w2 = nn.Parameter(torch.randn(320, 32)), nn.Parameter(torch.randn(320, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_experts_stacked_in_one_weight_are_refused_naming_the_weights():
    model = tiny_model("llama")
    model.config.model_type = "my_new_arch"
    for layer in model.model.layers:
        layer.mlp = _StackedExperts()
    with pytest.raises(SiteError, match=r"No FFL output projections") as err:
        find_ffl_sites(model)
    message = str(err.value)
    assert "weights outside linear modules (mlp.w1 [320, 32], mlp.w2 [320, 32])" in message
    assert "mlp.router (32->4)" in message and "not a transformers experts module" in message


# found by a review of mixtures of experts: FFL parts no site covered were left unhooked without a word
def test_experts_kept_in_embeddings_beside_a_dense_ffl_are_refused():
    """Doge's MoE variant (``is_moe=True``) keeps its routed experts in two embeddings inside the FFL container
    whose dense projections the table names: the table's sites would cover the dense part only."""
    from tiny_models import small_text_kwargs

    config = AutoConfig.for_model(
        "doge", **small_text_kwargs(), is_moe=True, num_experts=16, num_experts_per_tok=2
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        SiteError, match=r"mlp.down_embed.weight \[16, 32\], model.layers.0.mlp.up_embed"
    ) as err:
        find_ffl_sites(model)
    assert "experts kept in embeddings" in str(err.value)
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model("doge", **small_text_kwargs()))
    assert len(find_ffl_sites(dense)) == config.num_hidden_layers  # the dense variant keeps its sites


def test_a_dense_ffl_beside_experts_under_an_unknown_name_is_refused():
    """LongCat-Flash runs two dense FFLs (``mlps``) beside its experts in every layer: only the experts got sites."""
    from tiny_models import small_text_kwargs

    kw = {**small_text_kwargs(), "num_layers": 3, "num_hidden_layers": 6, "n_routed_experts": 4}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("longcat_flash", **kw))
    with pytest.raises(
        SiteError, match=r"Decoder layer 0 holds FFL output projections beside its experts"
    ) as err:
        find_ffl_sites(model)
    assert "(mlps.0.down_proj, mlps.1.down_proj)" in str(err.value)
    # a state-space mixer's output projection beside the experts is not an FFL (Granite 4.0-H with experts)
    from tiny_models import tiny_config

    hybrid = tiny_config("granitemoehybrid", num_local_experts=4, num_experts_per_tok=2)
    sites = find_ffl_sites(AutoModelForCausalLM.from_config(hybrid))
    assert [s.key_name for s in sites if s.block == 0] == [
        "model.layers.0.shared_mlp.output_linear",
        *(f"model.layers.0.block_sparse_moe.experts.down_proj[{e}]" for e in range(4)),
    ]
    # nor is a gated norm's small MLP (AXK2's input_layernorm.mlp.fc2, hidden -> 16 -> hidden)
    axk2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("axk2", **small_text_kwargs()))
    assert all(".mlp." in s.key_name and "norm" not in s.key_name for s in find_ffl_sites(axk2))


def test_ambiguous_output_projection_names_the_candidates():
    model = tiny_model("llama")
    model.config.model_type = "my_new_arch"
    for layer in model.model.layers:
        layer.mlp.down_proj_2 = nn.Linear(80, 32)
    with pytest.raises(SiteError, match="Several candidate FFL output") as err:
        find_ffl_sites(model)
    assert "mlp.down_proj," in str(err.value) and "mlp.down_proj_2" in str(err.value)
    assert "mlp.gate_proj (32->80)" in str(err.value)  # everything found is listed


class _NeutralNamesMLP(nn.Module):
    """LlamaMLP's gated FFL with projections called w1 / w3 / w2, names that do not say which one (``gate``) enters
    the activation."""

    def __init__(self, mlp: nn.Module, gate: str, up: str) -> None:
        super().__init__()
        self.gate_name, self.up_name, self.act_fn = gate, up, mlp.act_fn
        setattr(self, gate, mlp.gate_proj)
        setattr(self, up, mlp.up_proj)
        self.w2 = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(getattr(self, self.gate_name)(x)) * getattr(self, self.up_name)(x))


@pytest.mark.parametrize("gate,up", [("w1", "w3"), ("w3", "w1")])
def test_a_gate_whose_name_does_not_tell_is_found_from_the_layer_computation(gate, up, caplog):
    model = tiny_model("llama")
    model.config.model_type = "my_new_arch"
    for layer in model.model.layers:
        layer.mlp = _NeutralNamesMLP(layer.mlp, gate, up)
    # the gate is the projection that enters the activation, whichever name (and order) it has
    sites = find_ffl_sites(model)
    assert [(s.pre_name, s.key_name) for s in sites] == [
        (f"model.layers.{i}.mlp.{gate}", f"model.layers.{i}.mlp.w2") for i in range(2)
    ]
    # an activation that is neither the config's nor a common one: nothing can be told, the key sites remain
    for layer in model.model.layers:
        layer.mlp.act_fn = nn.Tanh()
    with caplog.at_level(logging.WARNING, logger="unlearn_hf.sites"):
        sites = find_ffl_sites(model)
    assert [(s.pre, s.key_name) for s in sites] == [(None, f"model.layers.{i}.mlp.w2") for i in range(2)]
    assert "several candidate FFL pre-activation" in sites[0].pre_missing
    assert "mlp.w1, mlp.w3" in sites[0].pre_missing or "mlp.w3, mlp.w1" in sites[0].pre_missing
    assert "key sites only in 2 of 2 layers" in caplog.text
    # the names form of the override resolves it
    sites = find_ffl_sites(model, {"pre": f"mlp.{gate}", "key": "mlp.w2"})
    assert [s.pre for s in sites] == [getattr(layer.mlp, gate) for layer in model.model.layers]


def test_override_missing_module():
    model = tiny_model("llama")
    with pytest.raises(SiteError, match=r"'model\.layers\.0\.mlp\.nope' from the override does not exist"):
        find_ffl_sites(model, {"pre": "mlp.nope", "key": "mlp.down_proj"})
    # from_base names it at once (the README's fused-model override pasted onto a Llama failed only at fit)
    from unlearn_hf import UnlearnedModelForCausalLM

    with pytest.raises(SiteError, match=r"'model\.layers\.0\.mlp\.gate_up_proj' from the override does not"):
        UnlearnedModelForCausalLM.from_base(model, sites={"pre": "mlp.gate_up_proj", "key": "mlp.down_proj"})
    good = UnlearnedModelForCausalLM.from_base(model, sites={"pre": "mlp.gate_proj", "key": "mlp.down_proj"})
    assert [s.pre for s in good.ffl_sites] == [layer.mlp.gate_proj for layer in model.model.layers]


def test_override_mismatched_widths():
    model = tiny_model("llama")
    with pytest.raises(SiteError, match=r"\(32->80\) and key .*\(32->32\).* not the two ends of one FFL"):
        find_ffl_sites(model, {"pre": "mlp.up_proj", "key": "self_attn.o_proj"})
    with pytest.raises(SiteError, match="must be linear projections"):
        find_ffl_sites(model, {"pre": "mlp.act_fn", "key": "mlp.down_proj"})
    with pytest.raises(SiteError, match="same module"):
        find_ffl_sites(model, {"pre": "mlp.down_proj", "key": "mlp.down_proj"})


def test_override_bad_forms():
    model = tiny_model("llama")
    with pytest.raises(SiteError, match="module name under 'key'"):
        find_ffl_sites(model, {"pre": "mlp.gate_proj", "kee": "mlp.down_proj"})
    with pytest.raises(SiteError, match="module name under 'key'"):
        find_ffl_sites(model, {"pre": "mlp.gate_proj", "key": "mlp.down_proj", "layer": "model.layers"})
    with pytest.raises(SiteError, match="mapping .* or a callable"):
        find_ffl_sites(model, ("mlp.gate_proj", "mlp.down_proj"))
    with pytest.raises(SiteError, match="No module named 'model.lay'"):
        find_ffl_sites(model, {"pre": "mlp.gate_proj", "key": "mlp.down_proj", "layers": "model.lay"})
    with pytest.raises(SiteError, match="not a module of"):
        find_ffl_sites(model, lambda m: [(nn.Linear(32, 80), m.model.layers[0].mlp.down_proj)])
    with pytest.raises(SiteError, match="also the site"):
        find_ffl_sites(
            model, lambda m: [(m.model.layers[0].mlp.gate_proj, m.model.layers[0].mlp.down_proj)] * 2
        )
    with pytest.raises(SiteError, match="gave none"):
        find_ffl_sites(model, lambda m: [])


def test_known_type_with_a_wrong_d_ff_in_the_config_is_refused():
    model = tiny_model("llama")
    model.config.intermediate_size = 81
    with pytest.raises(SiteError, match="config says 81"):
        find_ffl_sites(model)


@pytest.mark.parametrize("model_type,width_attr", [("opt", "ffn_dim"), ("xglm", "ffn_dim"), ("falcon", None)])
def test_a_width_keyword_the_config_class_does_not_use_is_ignored(model_type, width_attr):
    # OPTConfig(intermediate_size=...) keeps the stray keyword as an attribute; the model's width is ffn_dim (Falcon:
    # ffn_hidden_size, 4 x hidden by default), so the stray value must neither be read nor refuse the sites
    config = tiny_config(model_type, intermediate_size=7)
    assert config.intermediate_size == 7
    model = AutoModelForCausalLM.from_config(config)
    expected = getattr(config, width_attr) if width_attr else config.ffn_hidden_size
    assert [s.d_ff for s in find_ffl_sites(model)] == [expected] * config.num_hidden_layers
    assert config_d_ff(config, config.hidden_size) == expected
    # a declared width that disagrees with the modules is still refused
    setattr(config, width_attr or "ffn_hidden_size", expected + 1)
    with pytest.raises(SiteError, match=f"config says {expected + 1}"):
        find_ffl_sites(model)


def test_widths_of_configs_that_do_not_declare_them_as_fields_are_still_read():
    # a remote-code config with its own __init__ (InternLM2, Baichuan, ...) inherits PretrainedConfig's dataclass
    # fields but declares none of its own; BART-like text configs get their decoder width copied onto ``ffn_dim``
    class RemoteConfig(PretrainedConfig):
        model_type = "my_remote_arch"

        def __init__(self, **kwargs):
            self.intermediate_size, self.n_routed_experts = 256, 8
            super().__init__(**kwargs)

    remote = RemoteConfig()
    assert (config_d_ff(remote, 64), expert_count(remote)) == (256, 8)
    bart = AutoConfig.for_model("bart", d_model=32, decoder_ffn_dim=100, encoder_ffn_dim=90)
    assert config_d_ff(bart.get_text_config(decoder=True), 32) == 100


def test_known_type_whose_table_names_are_missing_falls_back_to_discovery(caplog):
    model = tiny_model("llama")
    model.config.model_type = "phi"  # the table says mlp.fc1 / mlp.fc2, which a Llama does not have
    with caplog.at_level(logging.WARNING, logger="unlearn_hf.sites"):
        sites = find_ffl_sites(model)
    assert [s.pre_name for s in sites] == [f"model.layers.{i}.mlp.gate_proj" for i in range(2)]
    assert "mlp.fc1" in caplog.text and "discovered" in caplog.text


def test_nothing_findable():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp = nn.Identity()
    with pytest.raises(
        SiteError, match=r"holding mlp\.gate_proj, mlp\.down_proj found: none.*Discovery failed too: No FFL"
    ):
        find_ffl_sites(model)
    model.config.model_type = "my_new_arch"
    with pytest.raises(SiteError, match="No FFL output projections .* found: no linear modules"):
        find_ffl_sites(model)
    with pytest.raises(SiteError, match="Cannot tell the decoder layers of Sequential"):
        find_ffl_sites(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)))


def test_bloom_slow_but_exact_is_refused_because_the_key_module_is_never_called():
    model = tiny_model("bloom", pretraining_tp=2, slow_but_exact=True)
    calls = []
    h = model.transformer.h[0].mlp.dense_4h_to_h.register_forward_pre_hook(lambda m, a: calls.append(1))
    model(input_ids=torch.tensor([[3, 4, 5]]))
    h.remove()
    assert calls == []  # a key hook would see nothing
    with pytest.raises(SiteError, match="slow_but_exact"):
        find_ffl_sites(model)


# -- a hand-written model without a config, through the override -------------------------------------------------


class ToyBlock(nn.Module):
    def __init__(self, hidden: int, d_ff: int) -> None:
        super().__init__()
        self.mix = nn.Linear(hidden, hidden)
        self.inp = nn.Linear(hidden, d_ff)
        self.out = nn.Linear(d_ff, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + torch.tanh(self.mix(h))
        return h + self.out(torch.relu(self.inp(h)))


class ToyLM(nn.Module):
    """A language model with no config and no Hugging Face base class."""

    def __init__(self, vocab: int = 50, hidden: int = 16, d_ff: int = 24, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(ToyBlock(hidden, d_ff) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@pytest.mark.parametrize(
    "override",
    [
        {"pre": "inp", "key": "out"},
        {"pre": "inp", "key": "out", "layers": "blocks"},
        lambda m: [(b.inp, b.out) for b in m.blocks],
        lambda m: [(f"blocks.{i}.inp", f"blocks.{i}.out") for i in range(len(m.blocks))],
    ],
    ids=["names", "names+layers", "callable-modules", "callable-names"],
)
def test_toy_model_through_the_override(override):
    torch.manual_seed(0)
    toy = ToyLM().eval()
    sites = find_ffl_sites(toy, override)
    assert [(s.pre_name, s.key_name, s.d_ff) for s in sites] == [
        (f"blocks.{i}.inp", f"blocks.{i}.out", 24) for i in range(3)
    ]
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    # hand computation of every block, from the embeddings
    with torch.no_grad():
        h = toy.embed.weight.double()[ids]
        pres, keys = [], []
        for b in toy.blocks:
            h = h + torch.tanh(linear64(b.mix, h))
            pre = linear64(b.inp, h)
            pres.append(pre)
            keys.append(torch.relu(pre))
            h = h + linear64(b.out, keys[-1])
    result = probe(toy, [{"input_ids": ids, "attention_mask": mask}], site=("pre", "key"), sites=sites)
    real = mask.bool().numpy()
    for i in range(3):
        for kind, ref in (("pre", pres[i]), ("key", keys[i])):
            values = ref.numpy()[real]
            np.testing.assert_allclose(
                result[kind].layers[i].mean.numpy(), values.mean(0), rtol=1e-5, atol=1e-6
            )
            assert result[kind].layers[i].count == real.sum()


def test_toy_model_without_override_cannot_be_discovered():
    with pytest.raises(SiteError, match="hidden size; layer 0 has: mix .*inp \\(16->24\\), out \\(24->16\\)"):
        find_ffl_sites(ToyLM())


def test_find_decoder_layers_refuses_two_equal_candidates():
    class TwoStacks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ModuleList(ToyBlock(8, 12) for _ in range(2))
            self.b = nn.ModuleList(ToyBlock(8, 12) for _ in range(2))

    with pytest.raises(SiteError, match=r"found: a \(2 x ToyBlock\), b \(2 x ToyBlock\)"):
        find_decoder_layers(TwoStacks())
    assert find_decoder_layers(TwoStacks(), "b")[0] == "b"


# -- helpers -----------------------------------------------------------------------------------------------------


def test_as_token_grid():
    x3 = torch.arange(24.0).view(2, 3, 4)
    assert as_token_grid(x3, 3) is x3
    flat = x3.reshape(6, 4)
    torch.testing.assert_close(as_token_grid(flat, 3), x3)
    with pytest.raises(SiteError, match="neither"):
        as_token_grid(flat, 4)


def test_linear_io_and_module_device():
    assert linear_io(nn.Linear(3, 5)) == (3, 5)
    assert linear_io(Conv1D(5, 3)) == (3, 5)  # Conv1D(nf=out, nx=in)
    assert linear_io(nn.ReLU()) is None
    lin = nn.Linear(3, 5)
    assert module_device(lin) == torch.device("cpu")

    class Hook:
        execution_device = "meta"

    lin._hf_hook = Hook()
    assert module_device(lin) == torch.device("meta")
    with pytest.raises(SiteError, match="no parameters"):
        module_device(nn.ReLU())
