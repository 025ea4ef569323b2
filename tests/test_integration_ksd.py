"""Key Space Detection on the real SmolLM2-135M-Instruct with the real data sets (METHOD.md §4).

Fit on 200 GSM8K train questions; on 100 GSM8K test questions, 100 MBPP task texts (test split, task_id 11-510)
and 100 MMLU questions (a deterministic spread over the 57 subjects), all in one template ``Question: …\\nAnswer:``,
the library's default layer and α must abstain on ≥ 90% of GSM8K and ≤ 5% of each of the others.

The helpers here (data loading, per-layer standardized distances) also drive ``benchmarks/ksd_sweep.py``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM

TEMPLATE = "Question: {}\nAnswer:"
N_FIT, N_EVAL = 200, 100
BATCH, MAX_LENGTH = 16, 256


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gsm8k_questions(data: Path, split: str, n: int) -> list[str]:
    return [TEMPLATE.format(r["question"]) for r in _jsonl(data / "gsm8k" / f"{split}.jsonl")[:n]]


def mbpp_questions(data: Path, n: int) -> list[str]:
    rows = [r for r in _jsonl(data / "mbpp" / "mbpp.jsonl") if 11 <= int(r["task_id"]) <= 510]
    rows.sort(key=lambda r: int(r["task_id"]))
    return [TEMPLATE.format(r["text"].replace("\r\n", "\n")) for r in rows[:n]]


def mmlu_questions(data: Path, n: int) -> list[str]:
    """Round-robin over the subjects (sorted by file name): row 0 of every subject, then row 1, ..."""
    subjects = []
    for path in sorted((data / "mmlu" / "test").glob("*.csv")):
        with open(path, encoding="utf-8", newline="") as f:
            subjects.append([row["question"] for row in csv.DictReader(f)])
    out, depth = [], 0
    while len(out) < n:
        for rows in subjects:
            if depth < len(rows) and len(out) < n:
                out.append(TEMPLATE.format(rows[depth]))
        depth += 1
    return out


def eval_sets(data: Path, n: int = N_EVAL) -> dict[str, list[str]]:
    return {
        "gsm8k": gsm8k_questions(data, "test", n),
        "mbpp": mbpp_questions(data, n),
        "mmlu": mmlu_questions(data, n),
    }


def by_length(tok, texts: list[str]) -> list[int]:
    """Order of ``texts`` by token count (batches of similar lengths waste little on padding)."""
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    return sorted(range(len(texts)), key=lambda i: lengths[i])


def left_batches(tok, texts: list[str], batch_size: int = BATCH, max_length: int = MAX_LENGTH):
    side, trunc = tok.padding_side, tok.truncation_side
    tok.padding_side, tok.truncation_side = "left", "left"
    try:
        for i in range(0, len(texts), batch_size):
            yield tok(
                texts[i : i + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
    finally:
        tok.padding_side, tok.truncation_side = side, trunc


def detect_all(unlearned, tok, texts: list[str]) -> torch.Tensor:
    """``detect`` over ``texts`` in length-sorted, left-padded batches; flags in the original order."""
    order = by_length(tok, texts)
    flags = torch.cat(
        [
            unlearned.detect(b["input_ids"], b["attention_mask"])
            for b in left_batches(tok, [texts[i] for i in order])
        ]
    )
    out = torch.empty_like(flags)
    out[torch.tensor(order)] = flags
    return out


def standardized_distances(model, tok, texts: list[str], fitted: dict[int, tuple]) -> dict[int, np.ndarray]:
    """Per layer, max_d |v_d − μ_d| / σ_d / k for the key vector v at each text's last real token (inside iff
    ≤ α). ``fitted``: layer -> (μ, σ, k). Our own hooks on the plain model; one forward per batch for all layers."""
    layers = sorted(fitted)
    out = {i: [] for i in layers}
    mask_now: list[torch.Tensor] = []

    def make(layer):
        mu, sd, k = (torch.as_tensor(x, dtype=torch.float64) for x in fitted[layer])

        def hook(module, args):
            key, mask = args[0], mask_now[0]
            last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
            v = key[torch.arange(key.shape[0]), last].double()
            out[layer].append((((v - mu).abs() / sd).amax(-1) / k).numpy())

        return hook

    sites = {s.layer: s for s in UnlearnedModelForCausalLM.from_base(model).ffl_sites}
    handles = [sites[i].key.register_forward_pre_hook(make(i)) for i in layers]
    order = by_length(tok, texts)
    try:
        with torch.no_grad():
            for b in left_batches(tok, [texts[i] for i in order]):
                mask_now[:] = [b["attention_mask"]]
                model(
                    input_ids=b["input_ids"],
                    attention_mask=b["attention_mask"],
                    use_cache=False,
                    logits_to_keep=1,
                )
    finally:
        for h in handles:
            h.remove()
    result = {}
    for i in layers:
        z = np.concatenate(out[i])
        unsorted = np.empty_like(z)
        unsorted[np.array(order)] = z
        result[i] = unsorted
    return result


@pytest.fixture
def unlearned_smollm2(smollm2):
    model, tok = smollm2
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    yield unlearned, tok
    unlearned.remove_all_methods()


@pytest.mark.slow
def test_default_ksd_separates_gsm8k_from_mbpp_and_mmlu(unlearned_smollm2, shared_data):
    unlearned, tok = unlearned_smollm2
    forget = gsm8k_questions(shared_data, "train", N_FIT)
    forget = [forget[i] for i in by_length(tok, forget)]  # same statistics, less padding
    method = unlearned.fit(
        KeySpaceDetectionConfig(),
        forget=forget,
        tokenizer=tok,
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        show_progress=False,
    )
    n_layers = unlearned.config.num_hidden_layers
    assert method.config.layers == [n_layers // 2] and method.config.alpha == 1.0
    assert method.state["count"].tolist() == [N_FIT]
    sets = eval_sets(shared_data)
    flags = {name: detect_all(unlearned, tok, texts) for name, texts in sets.items()}
    refused = {name: int(f.sum()) for name, f in flags.items()}
    rates = {name: f"{count}/{len(sets[name])}" for name, count in refused.items()}
    # integer comparisons: at least 90% of GSM8K refused, at most 5% of MBPP and of MMLU
    assert refused["gsm8k"] * 100 >= 90 * len(sets["gsm8k"]), rates
    assert refused["mbpp"] * 100 <= 5 * len(sets["mbpp"]), rates
    assert refused["mmlu"] * 100 <= 5 * len(sets["mmlu"]), rates

    # generation on the real model, one left-padded batch: two refused GSM8K questions say the refusal, two
    # answered MBPP tasks get exactly the base model's tokens
    g = [t for t, f in zip(sets["gsm8k"], flags["gsm8k"].tolist()) if f][:2]
    m = [t for t, f in zip(sets["mbpp"], flags["mbpp"].tolist()) if not f][:2]
    texts = [g[0], m[0], g[1], m[1]]
    expected = [True, False, True, False]
    batch = next(left_batches(tok, texts))
    n = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=16, do_sample=False)
    out = unlearned.generate(**batch, **kw, return_dict_in_generate=True)
    base = unlearned.base_model.generate(**batch, **kw)
    assert out.abstained.tolist() == expected
    refusal = tok(method.config.refusal, add_special_tokens=False)["input_ids"]
    for i, abstained in enumerate(expected):
        if abstained:
            assert out.sequences[i, n : n + len(refusal)].tolist() == refusal
            assert tok.decode(out.sequences[i, n:], skip_special_tokens=True) == method.config.refusal
        else:
            width = min(out.sequences.shape[1], base.shape[1])
            assert torch.equal(out.sequences[i, :width], base[i, :width])
            assert tok.decode(out.sequences[i, n:], skip_special_tokens=True) != method.config.refusal
