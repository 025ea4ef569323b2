"""The data and the measurement of the Key Space Detection benchmarks (``ksd_sweep.py``): the GSM8K / MBPP / MMLU
question sets in the template ``Question: …\\nAnswer:``, length-sorted left-padded batches, and each query's
standardized key distance per layer.

``tests/test_integration_ksd.py`` (the integration test) reads the same definitions, so the sweep measures what
the test checks.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from unlearn_hf import UnlearnedModelForCausalLM

TEMPLATE = "Question: {}\nAnswer:"
N_EVAL = 100
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
