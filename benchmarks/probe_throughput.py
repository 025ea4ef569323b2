"""Probe throughput and memory on SmolLM2-135M-Instruct (CPU), against a plain no_grad forward.

Prints tokens/s of the streaming probe (all layers, pre-activation + key sites) and of a plain forward over the
same batches, measured alternately in the same run, their ratio (target >= 0.90), and the peak resident memory
while probing 200 vs 800 examples (target: growth < 50 MB).

Note: the probe stops each forward after its last hooked layer, so it skips the LM head; the ratio therefore
also reports a forward that stops at the same place (``plain forward, no LM head``) for a like-for-like figure.

Usage: python benchmarks/probe_throughput.py [--examples 200] [--repeats 3] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from unlearn_hf import probe
from unlearn_hf.data import DataSpec, iter_token_batches
from unlearn_hf.models import load_smollm2

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not available")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def gsm8k_texts(data_dir: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in open(data_dir / "gsm8k" / "train.jsonl", encoding="utf-8")]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()

    model, tok = load_smollm2()
    spec = DataSpec(batch_size=args.batch_size, max_length=args.max_length)
    texts = gsm8k_texts(args.data, args.examples)
    _, batches = iter_token_batches(texts, tok, spec=spec)
    batches = list(batches)
    n_tokens = sum(int(b.attention_mask.sum()) for b in batches)
    decoder = model.get_decoder()

    @torch.no_grad()
    def plain(full: bool = True) -> None:
        for b in batches:
            (model if full else decoder)(
                input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False
            )

    def probed() -> None:
        feed = [{"input_ids": b.input_ids, "attention_mask": b.attention_mask} for b in batches]
        probe(model, feed, site=("pre", "key"), show_progress=False)

    plain()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "plain_no_head": [], "probe": []}
    runs = [("plain", plain), ("plain_no_head", lambda: plain(False)), ("probe", probed)]
    for r in range(args.repeats):  # the order reverses each repeat, so no run always follows the same one
        for name, fn in runs if r % 2 == 0 else runs[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{len(texts)} examples, {n_tokens} real tokens, batch {args.batch_size}, {torch.get_num_threads()} threads"
    )
    for name in times:
        print(f"  {name:14s} {n_tokens / med[name]:9.0f} tokens/s  (median of {args.repeats})")
    print(
        f"  ratio probe / backbone forward (like for like) = {med['plain_no_head'] / med['probe']:.3f}  (target >= 0.90)"
    )
    print(f"  ratio probe / full forward, with the LM head   = {med['plain'] / med['probe']:.3f}")

    peaks = {}
    for n in (200, 800):
        data = gsm8k_texts(args.data, n)
        reset_peak_rss()
        base = peak_rss_mb()
        probe(model, data, tok, site=("pre", "key"), spec=spec, show_progress=False)
        peaks[n] = peak_rss_mb() - base
    growth = peaks[800] - peaks[200]
    print(f"  peak RSS growth while probing: 200 ex {peaks[200]:.1f} MB, 800 ex {peaks[800]:.1f} MB")
    print(f"  growth 200 -> 800 examples = {growth:.1f} MB  (target < 50 MB)")


if __name__ == "__main__":
    main()
