"""Mixtures of experts (transformers 5 fused experts): one site per routed expert over the tokens routed to it, plus
shared experts and dense layers; statistics against a hand computation from the raw 3-D weights and the router's
choices; Neuron Adjust and Selective Pruning on expert sites; Key Space Detection's default layer (its routed decision:
``test_moe_ksd.py``); generate, save/load, deepcopy, and a model without methods left as it was."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers_na import token_batches
from tiny_models import small_text_kwargs
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.activations import ACT2FN

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
    probe,
)
from unlearn_hf.sites import find_ffl_sites

FORGET, RETAIN = dict(lo=3, hi=64), dict(lo=64, hi=128)
_BASE = small_text_kwargs()
#: model_type -> (config, experts per MoE layer, the dense sites' key modules, gate layout of the experts)
MOE = {
    "mixtral": (dict(num_local_experts=4), 4, [], "first_half"),
    "qwen2_moe": (
        dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, shared_expert_intermediate_size=48
        ),
        4,
        [f"model.layers.{i}.mlp.shared_expert.down_proj" for i in range(2)],
        "first_half",
    ),
    "qwen3_moe": (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40), 4, [], "first_half"),
    "olmoe": (dict(num_experts=4, num_experts_per_tok=2), 4, [], "first_half"),
    "gpt_oss": (dict(num_local_experts=4, num_experts_per_tok=2), 4, [], "even"),
    "deepseek_v3": (  # layer 0 dense, layer 1 shared experts + routed ones
        dict(
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=40,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
        4,
        ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_experts.down_proj"],
        "first_half",
    ),
    # GraniteMoeShared: a dense shared_mlp (fused gate/up input_linear) on the layer, beside block_sparse_moe (it was
    # left out: only the experts' container was searched; a review)
    "granitemoeshared": (
        dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48),
        4,
        [f"model.layers.{i}.shared_mlp.output_linear" for i in range(2)],
        "first_half",
    ),
    # Llama 4: every expert computes every token, its rows pre-scaled by the routing weight (0 where not routed)
    "llama4_text": (
        dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=40, intermediate_size_mlp=80),
        4,
        [f"model.layers.{i}.feed_forward.shared_expert.down_proj" for i in range(2)],
        "first_half",
    ),
    # DBRX: the experts' weights stacked in 2-D parameters (``mlp.w1`` / ``v1`` / ``w2``, ``[E * I, h]``); the
    # attention needs a rope_theta in its config and a clip_qkv (transformers 5.25 fails without either)
    "dbrx": (
        dict(
            d_model=32,  # what the sub-configs' sizes follow
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=40, moe_num_experts=4, moe_top_k=2),
        ),
        4,
        [],
        None,
    ),
}
#: the types whose experts take the top-k experts of each token (transformers' ``use_experts_implementation``,
#: DBRX)
TOP_K = sorted(set(MOE) - {"llama4_text"})
#: model_type -> (decoder layers, experts module in a layer, key weight) where they differ from Mixtral's
EXPERT_NAMES = {
    "dbrx": ("transformer.blocks", "ffn.experts", "mlp.w2"),
    "granitemoeshared": ("model.layers", "block_sparse_moe.experts", "down_proj"),
}


def reference_expert(experts, expert: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pre-activation, key)`` in float64 of ``expert``'s rows ``x`` ``[n, h]``, from the raw weights."""
    if hasattr(experts, "mlp"):  # DBRX: w2(act(w1 x) * v1 x), weights [E * I, h]
        w1, v1 = (
            getattr(experts.mlp, n).detach().double().view(experts.num_experts, -1, x.shape[-1])
            for n in ("w1", "v1")
        )
        gate = x @ w1[expert].T
        return gate, experts.mlp.activation_fn(gate) * (x @ v1[expert].T)
    w = experts.gate_up_proj[expert].detach().double()
    h = x @ w if experts.is_transposed else x @ w.T
    if experts.has_bias:
        h = h + experts.gate_up_proj_bias[expert].detach().double()
    return h, experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)


def moe_model(model_type: str, seed: int = 0, **overrides):
    config = AutoConfig.for_model(model_type, **{**_BASE, **MOE[model_type][0], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # biases are zero at init: randomize them so that a forgotten bias shows
        for name, param in model.named_parameters():
            if name.endswith("bias") and "experts" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    return model


def captured_then_probed(model, batches, sites, hooks):
    """Run ``batches`` through ``model`` with the forward pre-hooks ``hooks`` ``[(module, hook)]`` that capture the
    reference's inputs, then probe both sites: ``(statistics per kind, flags of the selected tokens)``."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    for h in handles:
        h.remove()
    result = probe(model, batches, site=("pre", "key"), sites=sites, show_progress=False)
    return result, torch.cat([b["attention_mask"].flatten().bool() for b in batches])


@pytest.fixture(scope="module", autouse=True)
def _one_thread_here(one_thread):
    """Tiny models run fastest on one thread."""


@pytest.mark.parametrize("model_type", TOP_K)
def test_expert_sites_and_their_statistics_match_a_hand_computation(model_type):
    model = moe_model(model_type)
    _, n_experts, dense, layout = MOE[model_type]
    sites = find_ffl_sites(model)
    assert [s.layer for s in sites] == list(range(len(sites)))
    assert [s.key_name for s in sites if not s.routed] == dense
    moe_blocks = sorted({s.decoder_layer for s in sites if s.routed})
    assert moe_blocks == ([1] if model_type == "deepseek_v3" else [0, 1])
    for block in moe_blocks:
        experts = [s for s in sites if s.routed and s.decoder_layer == block]
        assert [s.expert for s in experts] == list(range(n_experts)) and {s.gate for s in experts} == {layout}
        layers, module, key = EXPERT_NAMES.get(model_type, ("model.layers", "mlp.experts", "down_proj"))
        assert experts[0].key_name == f"{layers}.{block}.{module}.{key}[0]"
        assert sites.index(experts[0]) > max(
            (sites.index(s) for s in sites if s.decoder_layer == block and not s.routed), default=-1
        )

    # the reference: the router's top-k choice, the experts' input, and the raw 3-D weights
    batches = token_batches(0, **FORGET, n=2)
    routed: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {b: [] for b in moe_blocks}
    owner = {s.decoder_layer: s.key.owner for s in sites if s.routed}  # the experts module of each block
    hooks = [
        (
            owner[b],
            lambda m, a, b=b: routed[b].append(
                (a[0].detach().double().reshape(-1, a[0].shape[-1]), a[1].detach())
            ),
        )
        for b in moe_blocks
    ]
    result, selected = captured_then_probed(model, batches, sites, hooks)
    for s in (s for s in sites if s.routed):
        pre_rows, key_rows = [], []
        for x, top_k in routed[s.decoder_layer]:
            pre, key = reference_expert(owner[s.decoder_layer], s.expert, x[(top_k == s.expert).any(-1)])
            pre_rows.append(pre)
            key_rows.append(key)
        mask = selected[torch.cat([(t == s.expert).any(-1) for _, t in routed[s.decoder_layer]])]
        gate = s.pre_activation(torch.cat(pre_rows))[mask].numpy()
        key = torch.cat(key_rows)[mask].numpy()
        for kind, values in (("pre", gate), ("key", key)):
            stats = result[kind].layers[s.layer]
            assert stats.count == values.shape[0] > 1
            np.testing.assert_allclose(stats.mean.numpy(), values.mean(0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(stats.variance.numpy(), values.var(0, ddof=1), rtol=1e-3, atol=1e-5)
    # the activation of Mixtral-style experts is the config's: act(gate) * up
    if model_type == "mixtral":
        experts = model.model.layers[0].mlp.experts
        h = torch.randn(3, 160, dtype=torch.float64)
        torch.testing.assert_close(experts._apply_gate(h), ACT2FN["silu"](h[:, :80]) * h[:, 80:])


def test_llama4_expert_sites_and_statistics_match_a_hand_computation_from_the_router():
    """Llama 4's experts see every token, scaled by its routing weight (0 where not routed): an expert's sites are
    its routed tokens' gate/up output (of the scaled input, as the model computes it) and its key."""
    model = moe_model("llama4_text")
    sites = find_ffl_sites(model)
    assert [(s.decoder_layer, s.expert) for s in sites] == [
        (b, e) for b in (0, 1) for e in (None, 0, 1, 2, 3)
    ]
    assert sites[1].pre_name == "model.layers.0.feed_forward.experts.gate_up_proj[0]"
    assert sites[1].key_name == "model.layers.0.feed_forward.experts.down_proj[0]"
    assert {s.gate for s in sites if s.routed} == {"first_half"} and sites[1].d_ff == 40
    batches = token_batches(0, **FORGET, n=2)
    inputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    hooks = [
        (
            model.model.layers[b].feed_forward,
            lambda m, a, b=b: inputs[b].append(a[0].detach().reshape(-1, a[0].shape[-1])),
        )
        for b in inputs
    ]
    result, selected = captured_then_probed(model, batches, sites, hooks)
    for s in (s for s in sites if s.routed):
        moe = model.model.layers[s.decoder_layer].feed_forward
        pre_rows, routed_flags = [], []
        for x in inputs[s.decoder_layer]:
            with torch.no_grad():  # the router's own float32 choice, top-1 of 4, sigmoid weight
                logits = nn.functional.linear(x, moe.router.weight)
                routed = logits.topk(1, dim=1).indices[:, 0] == s.expert
                scaled = (x * torch.sigmoid(logits[:, s.expert : s.expert + 1])).double()
            pre_rows.append(scaled[routed] @ moe.experts.gate_up_proj[s.expert].detach().double())
            routed_flags.append(routed)
        h = torch.cat(pre_rows)[selected[torch.cat(routed_flags)]]
        gate, up = h[:, :40], h[:, 40:]
        for kind, values in (("pre", gate), ("key", up * nn.functional.silu(gate))):
            stats = result[kind].layers[s.layer]
            assert stats.count == values.shape[0] > 1
            np.testing.assert_allclose(stats.mean.numpy(), values.mean(0).numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(stats.variance.numpy(), values.var(0).numpy(), rtol=1e-3, atol=1e-5)
    # the tapped computation is the module's own: without methods the model's output is untouched
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    plain = moe_model("llama4_text")
    with torch.no_grad():
        assert torch.equal(unlearned(**batches[0]).logits, plain(**batches[0]).logits)


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_neuron_adjust_and_selective_pruning_on_expert_sites(model_type):
    plain = moe_model(model_type)
    model = moe_model(model_type)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    sites = unlearned.ffl_sites
    batch = token_batches(2, **FORGET, n=1)[0]
    with torch.no_grad():
        base = plain(**batch).logits
        assert torch.equal(unlearned(**batch).logits, base)  # no method: the model's own forward, untouched
    raw: dict[int, list[torch.Tensor]] = {s.layer: [] for s in sites}
    handles = [
        s.pre.register_forward_hook(lambda m, a, o, i=s.layer: raw[i].append(o.detach().clone()))
        for s in sites
    ]
    na = unlearned.fit(
        NeuronAdjustConfig(ratio=0.2, deterministic=True),
        token_batches(0, **FORGET, n=2),
        token_batches(1, **RETAIN, n=2),
        name="na",
        show_progress=False,
    )
    for i in raw:
        raw[i].clear()
    used: dict[int, list[torch.Tensor]] = {s.layer: [] for s in sites}
    handles += [
        s.pre.register_forward_hook(lambda m, a, o, i=s.layer: used[i].append(o.detach().clone()))
        for s in sites
    ]
    with torch.no_grad():
        adjusted = unlearned(**batch, use_cache=False).logits
    for h in handles:
        h.remove()
    assert not torch.equal(adjusted, base)
    state = {k: v.double().numpy() for k, v in na.state.items()}
    changed = 0
    for s in sites:
        assert len(raw[s.layer]) == len(used[s.layer])
        for x, y in zip(raw[s.layer], used[s.layer]):
            g, h = s.pre_activation(x.double()).numpy(), s.pre_activation(y.double()).numpy()
            pos = state["layer_index"] == s.layer
            neurons = state["neuron_index"][pos].astype(int)
            others = np.setdiff1d(np.arange(s.d_ff), neurons)
            np.testing.assert_array_equal(h[..., others], g[..., others])
            v = g[..., neurons]
            mf, sf, mr, sr = (
                state[n][pos] for n in ("forget_mean", "forget_std", "retain_mean", "retain_std")
            )
            grows = -0.5 * ((v - mf) / sf) ** 2 - np.log(sf) > -0.5 * ((v - mr) / sr) ** 2 - np.log(sr)
            np.testing.assert_allclose(
                h[..., neurons], np.where(grows, mr - (v - mf) / sf * sr, v), rtol=1e-4, atol=1e-5
            )
            changed += int((h[..., neurons] != v).sum())
    assert changed > 0

    # stochastic Neuron Adjust and Selective Pruning on the same sites; decoding one token leaves experts idle
    unlearned.remove_method("na")
    unlearned.fit(
        NeuronAdjustConfig(ratio=0.1, seed=5),
        token_batches(0, **FORGET, n=2),
        token_batches(1, **RETAIN, n=2),
        show_progress=False,
    )
    unlearned.fit(
        SelectivePruningConfig(ratio=0.05),
        token_batches(0, **FORGET, n=2),
        token_batches(1, **RETAIN, n=2),
        show_progress=False,
    )
    row = {k: v[:1, :4] for k, v in batch.items()}
    first = unlearned.generate(**row, max_new_tokens=5, do_sample=False)
    again = unlearned.generate(**row, max_new_tokens=5, do_sample=False)
    assert torch.equal(first, again) and first.shape == (1, 9)  # seeded per request: the same draws


def test_key_space_detection_defaults_to_the_middle_dense_site_else_the_middle_experts_layer():
    """Uncalibrated, Key Space Detection reads the middle dense site (a shared expert) where the model has one, else
    the routed experts of the middle layer (``tests/test_moe_ksd.py`` checks their decision)."""
    tok_rows = [
        {
            "input_ids": (ids := torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(i))),
            "attention_mask": torch.ones_like(ids),
        }
        for i in range(8)
    ]
    ksd = dict(inputs="prompts", alpha=1.0, window=1, action="eos")
    mixtral = UnlearnedModelForCausalLM.from_base(moe_model("mixtral"))
    method = mixtral.fit(KeySpaceDetectionConfig(**ksd), tok_rows, show_progress=False, batch_size=1)
    assert {mixtral.ffl_sites[i].decoder_layer for i in method.config.layers} == {1}  # the 2nd of 2 layers
    assert all(mixtral.ffl_sites[i].routed for i in method.config.layers)

    qwen = UnlearnedModelForCausalLM.from_base(moe_model("qwen2_moe"))
    method = qwen.fit(KeySpaceDetectionConfig(**ksd), tok_rows, show_progress=False, batch_size=1)
    assert (
        method.config.layers == [5] and not qwen.ffl_sites[5].routed
    )  # the middle dense site: a shared expert
    with torch.no_grad():
        assert all(bool(qwen.detect(**row)[0]) for row in tok_rows)
        assert all(bool(mixtral.detect(**row)[0]) for row in tok_rows)


def test_save_load_and_deepcopy(tmp_path):
    unlearned = UnlearnedModelForCausalLM.from_base(moe_model("qwen2_moe"))
    forget, retain = token_batches(0, **FORGET, n=2), token_batches(1, **RETAIN, n=2)
    unlearned.fit(NeuronAdjustConfig(ratio=0.1, seed=2), forget, retain, name="na", show_progress=False)
    unlearned.fit(SelectivePruningConfig(ratio=0.05), forget, retain, name="sp", show_progress=False)
    batch = token_batches(3, **FORGET, n=1)[0]
    with torch.no_grad():
        before = unlearned(**batch).logits
    unlearned.save_pretrained(tmp_path / "u", base_model_name_or_path="tiny/qwen2_moe")
    loaded = UnlearnedModelForCausalLM.from_pretrained(tmp_path / "u", base_model=moe_model("qwen2_moe"))
    twin = copy.deepcopy(unlearned)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, before)
        assert torch.equal(twin(**batch).logits, before)
        unlearned.remove_all_methods()
        assert torch.equal(twin(**batch).logits, before)  # the copy has methods and taps of its own
        assert torch.equal(unlearned(**batch).logits, moe_model("qwen2_moe")(**batch).logits)


def test_experts_that_saw_too_few_tokens_are_left_out_of_the_selection(caplog):
    config = AutoConfig.for_model(
        "qwen2_moe",
        **{**_BASE, **MOE["qwen2_moe"][0], "num_experts": 16, "num_experts_per_tok": 1},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    forget, retain = (
        token_batches(0, **FORGET, n=1, batch=2, width=4),
        token_batches(1, **RETAIN, n=1, batch=2, width=4),
    )
    stats = {
        role: probe(model, data, site=("pre", "key"), sites=unlearned.ffl_sites, show_progress=False)
        for role, data in (("forget", forget), ("retain", retain))
    }
    starved = {
        kind: {
            s.layer
            for s in unlearned.ffl_sites
            if min(stats["forget"][kind].layers[s.layer].count, stats["retain"][kind].layers[s.layer].count)
            < need
        }
        for kind, need in (("pre", 2), ("key", 1))
    }
    assert starved["pre"] and starved["key"]  # 8 tokens or fewer per set over 16 experts: some see none
    with caplog.at_level("INFO", logger="unlearn_hf.methods.selection"):
        na = unlearned.fit(NeuronAdjustConfig(ratio=0.5), forget, retain, name="na", show_progress=False)
        sp = unlearned.fit(SelectivePruningConfig(ratio=0.5), forget, retain, name="sp", show_progress=False)
    assert "cannot be scored and are not selected" in caplog.text
    assert not set(na.state["layer_index"].tolist()) & starved["pre"]
    assert not set(sp.state["layer_index"].tolist()) & starved["key"]
    assert not unlearned.ffl_sites[0].routed and 0 in set(
        na.state["layer_index"].tolist()
    )  # the shared expert


def _deepseek_all_moe():
    """DeepSeek-V3 with every layer MoE: its routed experts run before its shared experts."""
    config = AutoConfig.for_model(
        "deepseek_v3", **{**_BASE, **MOE["deepseek_v3"][0], "first_k_dense_replace": 0}
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_stochastic_neuron_adjust_on_experts_keeps_its_draws_under_checkpointing():
    forget, retain = token_batches(0, **FORGET, n=2), token_batches(1, **RETAIN, n=2)
    na = UnlearnedModelForCausalLM.from_base(_deepseek_all_moe()).fit(
        NeuronAdjustConfig(ratio=0.2, seed=3), forget, retain, show_progress=False
    )
    batch = token_batches(4, **FORGET, n=1)[0]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    grads = {}
    for checkpointing in (False, True):
        unlearned = UnlearnedModelForCausalLM.from_base(_deepseek_all_moe())
        unlearned.add_method("na", na)
        if checkpointing:
            unlearned.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        unlearned.train()
        unlearned(**batch, labels=labels, use_cache=False).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in unlearned.named_parameters() if p.grad is not None}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_plain_model_keeps_its_own_forward_pickles_and_keeps_accelerate_hooks(tmp_path):
    from accelerate import cpu_offload

    base = moe_model("gpt_oss")
    base.set_experts_implementation("batched_mm")
    batch = token_batches(3, **FORGET, n=1)[0]
    with torch.no_grad():
        before = base(**batch).logits
    unlearned = UnlearnedModelForCausalLM.from_base(base)
    unlearned.fit(
        NeuronAdjustConfig(ratio=0.1, seed=1),
        token_batches(0, **FORGET, n=2),
        token_batches(1, **RETAIN, n=2),
        show_progress=False,
    )
    with torch.no_grad():  # not the eager loop of the taps: bit for bit the model's own batched_mm
        assert torch.equal(base(**batch).logits, before)
        with unlearned.disable_unlearning():
            assert torch.equal(unlearned(**batch).logits, before)
    plain = moe_model("qwen2_moe")
    probe(plain, token_batches(0, **FORGET, n=1), show_progress=False)  # installs the taps
    torch.save(plain, tmp_path / "plain.pt")
    again = torch.load(tmp_path / "plain.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, plain(**batch).logits)

    offloaded = moe_model("mixtral")
    with torch.no_grad():
        reference = offloaded(**batch).logits
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    sites = find_ffl_sites(offloaded)  # installs the taps (and checks them) through accelerate's hooks
    seen = []
    handle = sites[0].key.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    with torch.no_grad():
        assert torch.equal(offloaded(**batch).logits, reference)  # untapped: accelerate's forward
    handle.remove()
    assert (
        seen and offloaded.model.layers[0].mlp.experts.down_proj.is_meta
    )  # tapped, weights brought in and out


def test_a_dense_mlp_beside_the_experts_is_a_site():
    config = AutoConfig.for_model(
        "gemma4_text",
        **{**_BASE, "intermediate_size": 64},
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=40,
        hidden_size_per_layer_input=0,
    )
    torch.manual_seed(0)
    sites = find_ffl_sites(AutoModelForCausalLM.from_config(config).eval())
    assert [(s.key_name, s.routed) for s in sites if s.decoder_layer == 0] == [
        ("model.layers.0.mlp.down_proj", False)
    ] + [(f"model.layers.0.experts.down_proj[{e}]", True) for e in range(4)]


@pytest.mark.parametrize("model_type", ["qwen2_moe", "deepseek_v3"])
def test_the_probe_stops_after_the_last_decoder_layer_it_needs(model_type):
    """Shared experts run before (Qwen2-MoE) or after (DeepSeek-V3) the routed ones: the forward stops once every
    probed module of the last probed decoder layer has finished, with the statistics of a full pass."""
    model = moe_model(model_type)
    sites = find_ffl_sites(model)
    first = [s.layer for s in sites if s.decoder_layer == (1 if model_type == "deepseek_v3" else 0)]
    later = [s.layer for s in sites if s.decoder_layer > first[-1]]
    batches = token_batches(0, **FORGET, n=2)
    full = probe(model, batches, site=("pre", "key"), sites=sites, show_progress=False)
    calls = []
    handles = [model.lm_head.register_forward_hook(lambda *a: calls.append("head"))]
    if later:
        handles.append(model.model.layers[-1].register_forward_hook(lambda *a: calls.append("layer")))
    part = probe(model, batches, site=("pre", "key"), layers=first, sites=sites, show_progress=False)
    for h in handles:
        h.remove()
    assert calls == []
    for kind in ("pre", "key"):
        for i in first:
            a, b = part[kind].layers[i], full[kind].layers[i]
            assert a.count == b.count and torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_sites_stay_cached_while_their_modules_are_in_place(model_type):
    """The sites are found once and kept while every site's module (an expert's: its experts module) is still in
    the model; one replaced experts module makes them found again, over the new module."""
    unlearned = UnlearnedModelForCausalLM.from_base(moe_model(model_type))
    sites = unlearned.ffl_sites
    assert unlearned.ffl_sites is sites
    routed = next(s for s in sites if s.routed)
    owner = routed.key.owner
    parent = unlearned.get_base_model().get_submodule(
        routed.key_name.rsplit(".", 1)[0].rsplit(".experts", 1)[0]
    )
    replacement = copy.deepcopy(owner)
    for name, child in parent.named_children():
        if child is owner:
            setattr(parent, name, replacement)
    again = unlearned.ffl_sites
    assert again is not sites
    assert {s.key.owner for s in again if s.routed and s.block == routed.block} == {replacement}


def test_the_fingerprint_reads_one_row_of_a_fused_experts_weight():
    """``[E, out, in]`` expert weights are recorded by their first row, not by expert 0 whole (a 120B model's
    fused weights made every wrap and save read gigabytes; a review)."""
    import hashlib

    from unlearn_hf.persistence.fingerprint import parameter_records

    model = moe_model("mixtral")
    records = {r[0]: r for r in parameter_records(model)}
    fused = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    assert fused
    for name, p in fused.items():
        row = p.detach()[0, 0].float().numpy().astype("<f4")
        assert records[name][2] == list(p.shape)
        assert records[name][3] == hashlib.sha256(row.tobytes()).hexdigest()[:16]
