"""Tiny random causal LMs for the tests: a tiny Llama with the SmolLM2 vocabulary, and many dense architectures for
tests that must hold across model families.

``tiny_llama()`` builds a 2-layer Llama (hidden width 32, feed-forward width 64) with the SmolLM2 vocabulary size,
so the SmolLM2 tokenizer can drive it.
``tiny_model("gpt2")`` builds a 2-layer model with hidden width 32 (64 for MPT, whose ALiBi needs it), a
feed-forward width of 80, not ``4 * hidden``, wherever the config lets it (so a wrong ``d_ff`` shows), 4
attention heads and a 128-token vocabulary (``vocab_size=49152`` gives the SmolLM2 vocabulary).
``tiny_tokenizer()`` is a character-level tokenizer built offline whose ids fit that vocabulary.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

HIDDEN = 32
D_FF = 80
LAYERS = 2
HEADS = 4


def _llama_like(**extra: Any) -> dict[str, Any]:
    return dict(
        hidden_size=HIDDEN,
        intermediate_size=D_FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **extra,
    )


def _gpt2_like(**extra: Any) -> dict[str, Any]:
    return dict(n_embd=HIDDEN, n_inner=D_FF, n_layer=LAYERS, n_head=HEADS, n_positions=128, **extra)


#: model_type -> keyword arguments of ``AutoConfig.for_model`` (besides the vocabulary and special tokens).
_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _llama_like(),
    "mistral": _llama_like(head_dim=HIDDEN // HEADS, sliding_window=None),
    "qwen2": _llama_like(),
    "qwen3": _llama_like(head_dim=HIDDEN // HEADS),
    "gemma": _llama_like(head_dim=HIDDEN // HEADS),
    "gemma2": _llama_like(head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=16),
    "gemma3_text": _llama_like(
        head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=16
    ),
    "stablelm": _llama_like(),
    "olmo": _llama_like(),
    "olmo2": _llama_like(),
    "granite": _llama_like(),
    "cohere": _llama_like(),
    "starcoder2": _llama_like(),
    "ministral": _llama_like(head_dim=HIDDEN // HEADS, sliding_window=16),
    "olmo3": _llama_like(sliding_window=16),
    "smollm3": _llama_like(),
    "helium": _llama_like(head_dim=HIDDEN // HEADS),
    "exaone4": _llama_like(sliding_window=16),
    "seed_oss": _llama_like(head_dim=HIDDEN // HEADS),
    "nemotron": _llama_like(head_dim=HIDDEN // HEADS),
    "arcee": _llama_like(),
    **{
        t: _llama_like()
        for t in (
            "cohere2 diffllama doge ernie4_5 exaone hyperclovax internlm3 cwm flint beam iquestcoder "
            "phi3 glm glm4 jais2 nanochat modernbert-decoder"
        ).split()
    },
    **{t: _llama_like(head_dim=HIDDEN // HEADS) for t in ("ministral3", "vaultgemma")},
    "qwen3_5_text": _llama_like(head_dim=HIDDEN // HEADS, layer_types=["linear_attention", "full_attention"]),
    "lfm2": _llama_like(block_auto_adjust_ff_dim=True),  # d_ff = int(2 * 80 / 3) = 53, as real checkpoints
    "openai-gpt": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128),  # d_ff is 4 * hidden
    "falcon": dict(
        hidden_size=HIDDEN,
        ffn_hidden_size=D_FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=128,
    ),
    "biogpt": dict(
        hidden_size=HIDDEN,
        intermediate_size=D_FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=128,
    ),
    "phi": dict(
        hidden_size=HIDDEN,
        intermediate_size=D_FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=128,
    ),
    "persimmon": dict(
        hidden_size=HIDDEN,
        intermediate_size=D_FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=128,
    ),
    "gpt_neox": dict(
        hidden_size=HIDDEN,
        intermediate_size=D_FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=128,
    ),
    "gpt2": _gpt2_like(),
    "gpt_bigcode": _gpt2_like(),
    "gptj": _gpt2_like(rotary_dim=4),
    "codegen": _gpt2_like(n_ctx=128, rotary_dim=4),
    "gpt_neo": dict(
        hidden_size=HIDDEN,
        intermediate_size=D_FF,
        num_layers=LAYERS,
        num_heads=HEADS,
        attention_types=[[["global", "local"], 1]],
        window_size=16,
        max_position_embeddings=128,
    ),
    "bloom": dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS),  # d_ff is always 4 * hidden
    "mpt": dict(d_model=64, n_heads=HEADS, n_layers=LAYERS, max_seq_len=128),  # d_ff is always 4 * hidden
    "opt": dict(
        hidden_size=HIDDEN,
        ffn_dim=D_FF,
        word_embed_proj_dim=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=128,
    ),
    "xglm": dict(
        d_model=HIDDEN, ffn_dim=D_FF, num_layers=LAYERS, attention_heads=HEADS, max_position_embeddings=128
    ),
}

#: Architectures outside the table of known sites, whose sites discovery finds: the FFL sits in a container beside a
#: state-space or recurrent block (Granite 4.0-H's ``shared_mlp``, a fused gate/up; RecurrentGemma's ``mlp_block``,
#: whose width is half the config's intermediate_size). Both were refused before (a review).
_DISCOVERED_CONFIGS: dict[str, dict[str, Any]] = {
    "granitemoehybrid": _llama_like(
        num_local_experts=0,
        shared_intermediate_size=48,
        layer_types=["mamba", "attention"],
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
    ),
    "recurrent_gemma": _llama_like(
        head_dim=HIDDEN // HEADS, lru_width=HIDDEN, block_types=["recurrent", "attention"]
    ),
}

#: Every architecture of the table of known sites, each with a tiny config.
TINY_MODEL_TYPES: tuple[str, ...] = tuple(_CONFIGS)
#: Architectures whose sites only discovery finds.
DISCOVERED_MODEL_TYPES: tuple[str, ...] = tuple(_DISCOVERED_CONFIGS)


def small_text_kwargs(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a small decoder config (2 layers, hidden 32, d_ff 80, 4 heads of 8, 128 tokens) for
    model types built outside :func:`tiny_model` (mixtures of experts, the text part of image-text models)."""
    return {
        **_llama_like(head_dim=HIDDEN // HEADS),
        "vocab_size": 128,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **overrides,
    }


def tiny_config(model_type: str, vocab_size: int = 128, **overrides: Any):
    """The shrunken config of ``model_type`` (special tokens 0/1/2 inside the vocabulary)."""
    configs = {**_CONFIGS, **_DISCOVERED_CONFIGS}
    if model_type not in configs:
        raise ValueError(f"No tiny config for {model_type!r}; known: {', '.join(configs)}.")
    kwargs = {
        **configs[model_type],
        "vocab_size": vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        **overrides,
    }
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, vocab_size: int = 128, **overrides: Any) -> torch.nn.Module:
    """A tiny random ``AutoModelForCausalLM`` of ``model_type`` in float32, eval mode (dropout off).

    Biases and norm weights are randomized too (many are initialized to 0/1), so a test that forgets a bias
    or a norm cannot pass by luck.
    """
    config = tiny_config(model_type, vocab_size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.1)
            elif param.dim() == 1:  # norm scales
                param.copy_(1.0 + torch.randn_like(param) * 0.1)
    return model


def tiny_llama(vocab_size: int = 49152, layers: int = 2, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random Llama (hidden 32, d_ff 64) that uses the SmolLM2 vocabulary size."""
    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **overrides,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then printable ASCII and
    newline (100 ids, right padding); it matches the special tokens of :func:`tiny_model`."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def hook_count(model) -> int:
    """Forward hooks and pre-hooks registered on any module of ``model``, after a garbage collection: a dropped
    wrapper's hooks stay until the collector frees it (its finalizer removes them), and when that happens depends on
    what else the process allocated, so a count without it would depend on the tests that ran before."""
    gc.collect()
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def random_batches(seed: int, vocab_size: int, n: int = 3, shape: tuple[int, int] = (2, 10)) -> list[dict]:
    """``n`` seeded batches of random token ids in ``[3, vocab_size)`` with all-ones attention masks."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab_size, shape, generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out
