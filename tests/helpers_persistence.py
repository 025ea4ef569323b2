"""Shared by the persistence tests (saving, loading, bad files, Hub push): tiny fit data, the methods to fit, and
comparisons of outputs, generations and method states."""

from __future__ import annotations

import torch

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
)

FORGET = [
    "What is 2 + 3? Answer: 5",
    "Compute 7 * 8 = 56",
    "12 divided by 4 is 3",
    "The sum of 10 and 15 is 25",
    "Half of 18 is 9",
]
RETAIN = [
    "The cat sat on the mat.",
    "Paris is the capital of France.",
    "I like green tea in the morning.",
    "Birds can fly high above the hills.",
    "Rain falls softly in spring.",
]
#: A forget query (inside the KSD hypercube by construction: k covers every fitted query) and an unrelated one.
PROMPTS = [FORGET[0], "The old dog sleeps"]
CONFIGS = {
    "na": lambda: NeuronAdjustConfig(ratio=0.1, seed=3),
    "ksd": lambda: KeySpaceDetectionConfig(alpha=1.0),
    "sp": lambda: SelectivePruningConfig(ratio=0.1),
}


def fit_methods(model: UnlearnedModelForCausalLM, tokenizer, names) -> UnlearnedModelForCausalLM:
    for name in names:
        retain = None if name == "ksd" else RETAIN
        model.fit(CONFIGS[name](), FORGET, retain, tokenizer, name=name, show_progress=False, batch_size=4)
    return model


def encode(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left"))


@torch.no_grad()
def outputs(model, batch) -> dict[str, torch.Tensor]:
    """Logits, greedy and sampled generations (and abstention flags) of ``model`` on ``batch``."""
    out = {"logits": model(**batch).logits}
    greedy = model.generate(**batch, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    out["greedy"] = greedy.sequences
    if "abstained" in greedy:
        out["abstained"] = greedy["abstained"]
    torch.manual_seed(1234)
    out["sampled"] = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=50).clone()
    return out


def assert_same_outputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_methods(a: UnlearnedModelForCausalLM, b: UnlearnedModelForCausalLM) -> None:
    assert list(a.methods) == list(b.methods)
    for name, m in a.methods.items():
        n = b.methods[name]
        assert type(n) is type(m) and n.config.to_dict() == m.config.to_dict()
        sa, sb = m.state_dict(), n.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), (name, key)
