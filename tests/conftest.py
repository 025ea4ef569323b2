"""Shared fixtures: the real SmolLM2 model, the shared data sets, tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"The shared data sets are missing: expected {SHARED_DATA} (../shared/data from the repo)."
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct in float32, eval mode (shared: do not attach methods to
    it; wrap it with ``UnlearnedModelForCausalLM.from_base`` and remove what you attach)."""
    from unlearn_hf.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2):
    return smollm2[1]


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


@pytest.fixture
def tiny_model():
    return tiny_llama()
