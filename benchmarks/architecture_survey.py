"""Which causal LMs of the installed transformers the methods can use: every ``*ForCausalLM`` model type, built tiny
from its own config class, sorted by what ``find_ffl_sites`` makes of it.

Outcomes:
- ``table``: the model type is in ``KNOWN_SITES`` (tested with every method in tests/test_architectures.py);
- ``discovered``: found by discovery, with both sites (every method);
- ``key sites only``: found by discovery without a usable pre-activation (Key Space Detection, Selective Pruning);

and, for these three, whether every method its sites allow works on the tiny model (``methods``: Selective
Pruning and Neuron Adjust fit and change the logits, Key Space Detection at α = 1 contains every fitted row,
``generate`` runs; a model built whose forward on token ids fails, e.g. a drafter that needs its target model's
states, is surveyed without them: ``methods`` then says why). Before the checks every floating-point weight of two or
more dimensions that is all zero at initialization (xLSTM's gate projections) gets small random values from a seeded
generator (biases aside), else no change of an FFL could reach the logits; ``note`` then names them;
- ``refused: positions of its own``: sites found, but every method refuses the model at fit time with a
  ``SiteError`` saying that its FFLs run over positions that are not the input's tokens (CPM-Ant prepends prompt
  positions of its own);
- ``refused: module lists or >2-D weights`` (expert lists, recurrent or state-space blocks) / ``refused: sites``:
  ``SiteError``, whose message says why and how to name the sites;
- ``not built``: neither the per-type override (``_PER_TYPE``, for config classes that the generic shrinking leaves
  inconsistent or large: nested sub-configs, per-layer lists, state-space sizes) nor a variant of the generic
  shrinking (``_SMALL``, ``_VARIANTS``; a composite config gets the same sizes in its ``text_config``) gives a tiny
  model (the first try whose model runs a forward on token ids is surveyed, else the first that builds); the model
  type itself may work at its real size: these are not verdicts on the library.

Each type runs in its own process (some configs are large or hang), one worker per CPU by default. Writes
``benchmarks/architecture_survey.json`` and prints a summary.

Usage: python benchmarks/architecture_survey.py [--workers 2] [--timeout 120] [--types llama phi3 ...]
(``--types`` updates those entries of an existing ``architecture_survey.json``.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "architecture_survey.json"

#: The generic shrinking: every size attribute a config class may use, small (see ``_VARIANTS``).
_SMALL = dict(
    hidden_size=32,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    n_embd=32,
    n_layer=2,
    n_head=4,
    d_model=32,
    num_layers=2,
)
#: Variants tried in order until the tiny model runs a forward: the generic shrinking, with a head_dim, with the
#: sizes of multi-head latent attention (DeepSeek-V2/V3 and kin), with a small rotary_dim (GPT-J, CodeGen).
_VARIANTS = (
    {},
    {"head_dim": 8},
    dict(
        num_key_value_heads=4,
        head_dim=8,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
    ),
    {"head_dim": 8, "rotary_dim": 8},
)


#: Pieces shared by the per-type overrides: few small experts (with a shared one), Qwen3.5's small linear-attention
#: heads, Gemma 4's text layers (one sliding, one full), its drafters' centroids, small Mamba-2 heads.
_FEW_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
_SHARED_EXPERT = dict(_FEW_EXPERTS, shared_expert_intermediate_size=48)
_LINEAR_ATTENTION = dict(
    head_dim=8,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
)
_GEMMA4_TEXT = dict(
    head_dim=8, global_head_dim=16, layer_types=["sliding_attention", "full_attention"], sliding_window=16
)
_DRAFTER = dict(backbone_hidden_size=32, num_centroids=16, centroid_intermediate_top_k=4)
_MAMBA = dict(mamba_n_heads=4, mamba_d_state=16, mamba_chunk_size=16)

#: Per-type overrides, tried before ``_VARIANTS`` for their type: config kwargs merged over ``_SMALL`` (nested dicts
#: merged key by key), for the config classes that the generic shrinking leaves inconsistent or too large.
_PER_TYPE: dict[str, dict] = {
    # attention and FFN sizes live in nested configs; the attention reads a rope_theta and clamps with clip_qkv
    "dbrx": dict(
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2),
    ),
    # the routed experts have no default count (None)
    "dots1": dict(
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        first_k_dense_replace=1,
    ),
    # layer_types has no default; one dense layer, then a sparse one
    "lfm2_moe": dict(_FEW_EXPERTS, layer_types=["conv", "full_attention"], num_dense_layers=1),
    # Qwen3.5: the text model (gated delta net + full attention) with small linear-attention heads
    "qwen3_5": dict(text_config=dict(_LINEAR_ATTENTION, layer_types=["linear_attention", "full_attention"])),
    # as qwen3_5, with few small experts (256 by default)
    "qwen3_5_moe": dict(
        text_config=dict(
            _LINEAR_ATTENTION, **_SHARED_EXPERT, layer_types=["linear_attention", "full_attention"]
        )
    ),
    # as qwen3_5_moe, with hyper-connections and an indexed-attention layer, whose indexer sizes have no default
    "qwen4_exp": dict(
        text_config=dict(
            _LINEAR_ATTENTION,
            **_SHARED_EXPERT,
            layer_types=["linear_attention", "indexed_attention"],
            hc_lowrank=8,
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=8,
            indexer_budget=8,
            indexer_compress_ratio=4,
        )
    ),
    # small per-layer-input embeddings and global (full-attention) heads; one sliding and one full layer
    "gemma4": dict(
        text_config=dict(_GEMMA4_TEXT, vocab_size_per_layer_input=128, hidden_size_per_layer_input=8)
    ),
    # as gemma4 (the audio and vision towers are absent by default)
    "gemma4_unified": dict(text_config=_GEMMA4_TEXT),
    # the drafter of gemma4: no per-layer inputs, few centroids; its forward needs the target model's inputs_embeds
    # and shared_kv_states, so it is surveyed as built, without a forward on token ids
    "gemma4_assistant": dict(
        _DRAFTER, text_config=dict(_GEMMA4_TEXT, vocab_size_per_layer_input=0, hidden_size_per_layer_input=0)
    ),
    # as gemma4_assistant (the drafter of gemma4_unified)
    "gemma4_unified_assistant": dict(_DRAFTER, text_config=_GEMMA4_TEXT),
    # 15 KV-shared layers by default (more than 2); small per-layer inputs and LAuReL rank
    "gemma3n_text": dict(
        head_dim=8,
        vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=0,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
        laurel_rank=8,
    ),
    # rope_parameters are per layer type, without a default for them
    "cohere_compass_text": dict(
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
        rope_parameters=dict(
            sliding_attention=dict(rope_type="default", rope_theta=10000.0),
            full_attention=dict(rope_type="default", rope_theta=10000.0),
        ),
    ),
    # multi-head latent attention with as many KV heads as query heads, one indexed (DSA) and one sliding layer (its
    # sizes are the swa_* kwargs); the vision and audio adapters must output the text hidden size
    "dots3_note": dict(
        vision_config=dict(adapter_out_dim=32),
        audio_config=dict(adapter_out_dim=32),
        text_config=dict(
            num_key_value_heads=4,
            head_dim=16,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_experts_intermediate_size=48,
            index_topk=4,
            index_head_dim=8,
            index_n_heads=2,
            layer_types=["indexed_attention", "sliding_attention"],
            sliding_window=16,
            swa_num_attention_heads=4,
            swa_num_key_value_heads=4,
            swa_q_lora_rank=16,
            swa_kv_lora_rank=16,
            swa_head_dim=16,
            swa_qk_nope_head_dim=8,
            swa_v_head_dim=8,
        ),
    ),
    # head_dim a multiple of 16 (NVFP4 rounding); a dense sliding layer, then a sparse indexed-attention one
    "kolibri1_1": dict(
        head_dim=16,
        layer_types=["sliding_attention", "indexed_attention"],
        sliding_window=16,
        index_topk=4,
        index_pool_size=16,
        index_compression=4,
        index_num_heads=2,
        index_num_local_tokens=2,
        index_num_sink_tokens=1,
        **_SHARED_EXPERT,
        mlp_only_layers=[0],
        mlp_only_intermediate_size=80,
    ),
    # attention_types must expand to num_layers entries
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=16),
    # mamba_n_heads must divide mamba_expand * hidden_size; one mamba and one attention layer
    "bamba": dict(_MAMBA, attn_layer_indices=[1]),
    # as bamba, with few experts
    "granitemoehybrid": dict(
        _MAMBA,
        layer_types=["linear_attention", "full_attention"],
        num_local_experts=4,
        shared_intermediate_size=48,
    ),
    # num_heads * head_dim must equal expand * hidden_size
    "mamba2": dict(num_heads=4, head_dim=16, state_size=16, n_groups=1, chunk_size=16),
    # layers_block_type has one entry per layer; the shared transformer is tied across hybrid layers, so two of them
    "zamba": dict(
        num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"], mamba_d_state=8
    ),
    # layers_block_type has one entry per layer (54 by default)
    "zamba2": dict(
        layers_block_type=["linear_attention", "hybrid"],
        mamba_d_state=8,
        n_mamba_heads=4,
        chunk_size=16,
        adapter_rank=8,
    ),
    # few experts, one dense and one MoE layer
    "llama4": dict(
        text_config=dict(
            head_dim=8,
            num_local_experts=4,
            intermediate_size=48,
            intermediate_size_mlp=80,
            interleave_moe_layer_step=2,
            attention_chunk_size=16,
        )
    ),
    # a cross-attention layer among self-attention ones, as in the real model (skipped on text-only inputs)
    "mllama": dict(text_config=dict(num_hidden_layers=3, cross_attention_layers=[1])),
    # four nested transformers (entropy patcher, local encoder, global, local decoder), each of one small layer; the
    # global width is the encoder's times cross_attn_k; few hash embeddings (500002 by default)
    "blt": dict(
        vocab_size=260,
        local_attention_window_len=16,
        encoder_hash_byte_group_size=[3, 4],
        encoder_hash_byte_group_vocab=64,
        patcher_config=dict(
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=1,
            intermediate_size=80,
            vocab_size=260,
            sliding_window=16,
        ),
        encoder_config=dict(
            hidden_size=32,
            hidden_size_global=64,
            num_attention_heads=4,
            num_hidden_layers=1,
            intermediate_size=80,
            vocab_size=260,
        ),
        global_config=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=80),
        decoder_config=dict(
            hidden_size=32,
            hidden_size_global=64,
            num_attention_heads=4,
            num_hidden_layers=1,
            intermediate_size=80,
            vocab_size=260,
        ),
    ),
}


def _merge(base: dict, over: dict) -> dict:
    """``base`` updated with ``over``, dict values merged recursively."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else value
    return out


def _config_kwargs(model_type: str, extra: dict) -> dict:
    """The config kwargs of one try: ``extra`` merged over ``_SMALL``. A composite config (one with a ``text_config``,
    e.g. a vision-language model whose ``*ForCausalLM`` is its text model) gets the same flat sizes in its
    ``text_config`` too, merged under ``extra["text_config"]``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kwargs = _merge(_SMALL, extra)
    config_class = CONFIG_MAPPING[model_type]
    sub_configs = getattr(config_class, "sub_configs", None) or getattr(
        config_class, "sub_configs_defaults", {}
    )
    if "text_config" in sub_configs:
        flat = {key: value for key, value in kwargs.items() if not isinstance(value, dict)}
        kwargs["text_config"] = _merge(flat, extra.get("text_config", {}))
    return kwargs


def survey_one(model_type: str) -> dict:
    """Build ``model_type`` tiny and find its sites; the outcome as a JSON-ready dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from unlearn_hf.sites import KNOWN_SITES, SiteError, find_ffl_sites

    model, built, error, no_forward = None, None, None, None
    per_type = (_PER_TYPE[model_type],) if model_type in _PER_TYPE else ()
    for extra in per_type + _VARIANTS:
        try:
            config = AutoConfig.for_model(model_type, **_config_kwargs(model_type, extra))
        except Exception as err:  # noqa: BLE001 - any failure of a foreign config class is an outcome
            error = f"config: {type(err).__name__}: {err}"
            continue
        try:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).eval()
        except Exception as err:  # noqa: BLE001
            model, error = None, f"model: {type(err).__name__}: {err}"
            continue
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([[3, 4, 5, 6]]), use_cache=False)
            break
        except Exception as err:  # noqa: BLE001 - the next variant may run; else the first one built is surveyed
            if built is None:
                built, no_forward = model, f"{type(err).__name__}: {err}"
            model = None
    if model is None:  # none ran a forward: the first one built, whose methods cannot be checked
        model = built
    else:
        no_forward = None
    if model is None:
        return {"outcome": "not built", "detail": str(error)[:300]}
    try:
        sites = find_ffl_sites(model)
    except SiteError as err:
        blocks = "weights of more than two dimensions" in str(err)
        outcome = "refused: module lists or >2-D weights" if blocks else "refused: sites"
        return {"outcome": outcome, "detail": str(err)[:400]}
    first, filled = sites[0], []
    if no_forward is None:
        filled = fill_zero_weights(model)
        checks = check_methods(model, model_type)
    else:  # e.g. a drafter model, whose forward needs its target model's states
        checks = {"forward": f"n/a: the bare model's forward on token ids fails: {no_forward}"[:300]}
    fits = [checks[name] for name in ("sp", "na", "ksd") if name in checks]
    if fits and all(_OWN_POSITIONS in check for check in fits):
        outcome = "refused: positions of its own"
    elif model_type in KNOWN_SITES:
        outcome = "table"
    elif any(s.pre is None for s in sites):
        outcome = "key sites only"
    else:
        outcome = "discovered"
    entry = {
        "outcome": outcome,
        "class": type(model).__name__,
        "layers": len(sites),
        "pre": first.pre_name,
        "key": first.key_name,
        "gate": first.gate,
        "detail": first.pre_missing[:300],
        "methods": checks,
    }
    if outcome == "refused: positions of its own":
        entry["detail"] = fits[0].removeprefix("error: SiteError: ")
    if filled:
        names = ", ".join(filled)
        if len(names) > 300:
            names = names[: names.rfind(", ", 0, 300)] + ", ..."
        entry["note"] = (
            f"{len(filled)} all-zero weights given small random values before the method checks: {names}"
        )
    return entry


#: What the library's ``SiteError`` says of a model whose FFLs run over positions that are not the input's tokens.
_OWN_POSITIONS = "the library cannot tell which rows are the input's tokens"


def fill_zero_weights(model, std: float = 0.02) -> list[str]:
    """Give every floating-point parameter of two or more dimensions that is all zero, biases aside, small random
    values (normal, ``std``, from a generator seeded with 0, in parameter order); the names of those filled. Some
    types initialize projections at zero (xLSTM's gate projections), under which no change of an FFL reaches the
    logits and a method check would say nothing; a trained model's are not zero. Norm weights (one dimension) and
    biases of any shape (a zero bias hides no change; some, as routers' score corrections, start at zero by design)
    stay as built."""
    import torch

    gen, filled = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for name, param in model.named_parameters():
            weight = param.dim() >= 2 and param.is_floating_point() and not name.endswith("bias")
            if weight and not param.any():
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
                param.copy_(noise.to(param.dtype))
                filled.append(name)
    return filled


def check_methods(model, model_type: str) -> dict[str, str]:
    """Every method its sites allow, on random token rows: ``{check: "ok" | "error: ..."}``. KSD at α = 1 must
    contain each fitted row; Neuron Adjust and Selective Pruning must fit and change the logits; generate must run."""
    import torch

    from unlearn_hf import (
        KeySpaceDetectionConfig,
        NeuronAdjustConfig,
        SelectivePruningConfig,
        UnlearnedModelForCausalLM,
    )

    gen = torch.Generator().manual_seed(0)
    vocab = min(128, model.get_input_embeddings().weight.shape[0])

    def rows(lo, hi, n=4):
        out = []
        for _ in range(n):
            ids = torch.randint(lo, hi, (1, 6), generator=gen)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        return out

    forget, retain = rows(3, vocab // 2), rows(vocab // 2, vocab)  # 24 tokens each: rare experts see few
    unlearned = UnlearnedModelForCausalLM.from_base(model.eval())
    with torch.no_grad():
        plain = model(**forget[0], use_cache=False).logits
    configs = {"sp": SelectivePruningConfig(ratio=0.1)}
    if all(s.pre is not None for s in unlearned.ffl_sites):
        configs["na"] = NeuronAdjustConfig(ratio=0.1, deterministic=True)
    out = {}
    for name, config in configs.items():
        try:
            unlearned.fit(config, forget, retain, name=name, show_progress=False)
            with torch.no_grad():
                changed = not torch.equal(unlearned(**forget[0], use_cache=False).logits, plain)
            unlearned.remove_method(name)
            out[name] = "ok" if changed else "error: the logits did not change"
        except Exception as err:  # noqa: BLE001 - reported, not raised: the survey goes on
            out[name] = f"error: {type(err).__name__}: {err}"[:500]
    try:
        # routed experts: a row is inside at alpha 1 when one of its experts got 2 fitted rows (with 200 rows, all
        # experts of the tiny models do)
        queries = forget + rows(3, vocab // 2, 196)
        ksd = KeySpaceDetectionConfig(inputs="prompts", layers=None, alpha=1.0, window=1, action="eos")
        unlearned.fit(ksd, queries, name="ksd", show_progress=False, batch_size=1)
        with torch.no_grad():
            inside = all(bool(unlearned.detect(**row)[0]) for row in queries)
        out["ksd"] = "ok" if inside else "error: a fitted row is outside the hypercube at alpha 1"
    except Exception as err:  # noqa: BLE001
        out["ksd"] = f"error: {type(err).__name__}: {err}"[:500]
    try:
        with unlearned.disable_unlearning():
            unlearned.generate(**retain[0], max_new_tokens=2, do_sample=False, pad_token_id=0)
    except Exception as err:  # noqa: BLE001 - the tiny config's own problem, not the library's
        out["generate"] = f"n/a: the bare model's generate fails too: {type(err).__name__}: {err}"[:300]
        return out
    try:
        generated = unlearned.generate(**retain[0], max_new_tokens=2, do_sample=False, pad_token_id=0)
        out["generate"] = "ok" if generated.shape[1] >= 7 else "error: nothing generated"
    except Exception as err:  # noqa: BLE001
        out["generate"] = f"error: {type(err).__name__}: {err}"[:300]
    return out


def _run(model_type: str, timeout: float) -> tuple[str, dict]:
    cmd = [sys.executable, __file__, "--one", model_type]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        # this checkout, installed or not (an editable install may point at another copy)
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return model_type, {"outcome": "not built", "detail": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return model_type, {
            "outcome": "not built",
            "detail": (done.stderr.strip().splitlines() or ["?"])[-1][:300],
        }
    return model_type, json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument(
        "--types", nargs="*", help="model types to (re)survey (default: every *ForCausalLM type)"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(survey_one(args.one)))
        return
    from transformers import __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    with ThreadPoolExecutor(args.workers) as pool:
        results = dict(pool.map(lambda t: _run(t, args.timeout), types))
    if args.types and OUT.exists():  # update those entries of the last full survey
        results = {**json.loads(OUT.read_text())["types"], **results}
    counts = Counter(r["outcome"] for r in results.values())
    OUT.write_text(
        json.dumps(
            {"transformers": __version__, "counts": counts, "types": results}, indent=1, sort_keys=True
        )
        + "\n"
    )
    for outcome, n in counts.most_common():
        names = ", ".join(t for t, r in sorted(results.items()) if r["outcome"] == outcome)
        print(f"{outcome}: {n}\n  {names}")


if __name__ == "__main__":
    main()
