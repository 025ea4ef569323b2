"""The table of known architectures: where each model type's FFL sites are, and which model types do not declare
their FFL width in the config."""

from __future__ import annotations

_GATED = ("mlp.gate_proj", "mlp.down_proj")

#: model_type -> (pre-activation module, key module[, gate layout of a fused gate/up projection]), relative to
#: the decoder layer.
KNOWN_SITES: dict[str, tuple[str, ...]] = {
    **{
        t: _GATED
        for t in (
            "llama",
            "mistral",
            "ministral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "stablelm",
            "olmo",
            "olmo2",
            "olmo3",
            "granite",
            "cohere",
            "smollm3",
            "helium",
            "exaone4",
            "seed_oss",
            "cohere2",
            "diffllama",
            "doge",
            "ernie4_5",
            "exaone",
            "hyperclovax",
            "internlm3",
            "cwm",
            "ministral3",
            "vaultgemma",
            "qwen3_5_text",
            "flint",
            "beam",
            "iquestcoder",
        )
    },
    "lfm2": ("feed_forward.w1", "feed_forward.w2"),  # w2(silu(w1 x) * w3 x)
    "nanochat": ("mlp.fc1", "mlp.fc2"),
    "openai-gpt": ("mlp.c_fc", "mlp.c_proj"),
    "jais2": ("mlp.up_proj", "mlp.down_proj"),
    "phi": ("mlp.fc1", "mlp.fc2"),
    **{t: ("mlp.c_fc", "mlp.c_proj") for t in ("gpt2", "gpt_bigcode", "gpt_neo", "starcoder2")},
    **{t: ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h") for t in ("gpt_neox", "bloom", "persimmon", "falcon")},
    **{t: ("fc1", "fc2") for t in ("opt", "xglm", "biogpt")},
    **{t: ("mlp.fc_in", "mlp.fc_out") for t in ("gptj", "codegen")},
    **{t: ("mlp.up_proj", "mlp.down_proj") for t in ("nemotron", "arcee")},
    "mpt": ("ffn.up_proj", "ffn.down_proj"),
    # fused: ``gate, up = gate_up_proj(x).chunk(2, dim=-1)``
    **{t: ("mlp.gate_up_proj", "mlp.down_proj", "first_half") for t in ("phi3", "glm", "glm4")},
    # input, gate = Wi(x).chunk(2); Wo(act(input) * gate): the first half enters the activation
    "modernbert-decoder": ("mlp.Wi", "mlp.Wo", "first_half"),
}

#: model types whose config does not state the FFL width (LFM2 rescales ``intermediate_size`` by default): the
#: width is read from the modules alone.
WIDTH_FROM_MODULES = {"lfm2"}

#: model types whose FFL width is not a config attribute: d_ff = 4 * hidden (or ``n_inner``/``intermediate_size``
#: when set).
FOUR_X_HIDDEN = {
    "bloom": None,
    "openai-gpt": None,
    "mpt": None,  # transformers' MptMLP ignores config.expansion_ratio
    "gpt2": "n_inner",
    "gpt_bigcode": "n_inner",
    "gptj": "n_inner",
    "codegen": "n_inner",
    "gpt_neo": "intermediate_size",
}
