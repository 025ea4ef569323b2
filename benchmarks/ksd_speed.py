"""Decode speed with Key Space Detection attached, against the bare model (SmolLM2-135M-Instruct, CPU).

KSD is fitted (default config) on GSM8K train questions; the prompts are MBPP tasks that it does not refuse, so
the full answer is generated (``min_new_tokens`` = ``max_new_tokens``) and both models must produce the same
tokens. For each batch size, bare and unlearned runs alternate (the order flips every repeat); decode tokens/s
counts the tokens generated after the prefill, timed from the end of the prefill (first logits-processor call)
to the end of ``generate``. Reported: median rates and the median of the per-repeat ratios unlearned / bare
(target ≥ 0.98), the same ratio per second of process CPU time, which a busy shared machine disturbs less than
wall-clock time, and the end-to-end ratio (prefill included, where KSD decides).

Usage: python benchmarks/ksd_speed.py [--batch-sizes 1,8] [--new-tokens 64] [--repeats 5] [--fit 50]
       [--threads N] [--data ../shared/data]
Small check: python benchmarks/ksd_speed.py --batch-sizes 1 --new-tokens 8 --repeats 1 --fit 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import PrefillClock  # noqa: E402
from benchmarks.ksd_eval import left_batches, mbpp_questions  # noqa: E402
from benchmarks.ksd_formats import fit_data  # noqa: E402
from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM  # noqa: E402
from unlearn_hf.models import load_smollm2  # noqa: E402


def timed_generate(model, batch, new_tokens: int) -> tuple[float, float, float, torch.Tensor]:
    """Decode tokens per wall-clock second and per CPU second of one ``generate`` call, its generated tokens per
    wall-clock second end to end (prefill included: where KSD decides), and its output."""
    clock = PrefillClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )
    end = (time.perf_counter(), time.process_time())
    decoded = batch["input_ids"].shape[0] * (new_tokens - 1)
    e2e = batch["input_ids"].shape[0] * new_tokens / (end[0] - start)
    return decoded / (end[0] - clock.first[0]), decoded / (end[1] - clock.first[1]), e2e, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fit", type=int, default=50, help="GSM8K train questions to fit KSD on")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's; 1 is steadier on a busy machine)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode steps follow the prefill)")

    model, tok = load_smollm2()
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    forget, retain = fit_data(data, args.fit)  # plain questions, calibrated: the library's default setting
    method = unlearned.fit(KeySpaceDetectionConfig(), forget, retain, tok, show_progress=False)
    candidates = mbpp_questions(data, 4 * max(sizes))
    flags = torch.cat(
        [unlearned.detect(b["input_ids"], b["attention_mask"]) for b in left_batches(tok, candidates)]
    )
    prompts = [t for t, f in zip(candidates, flags.tolist()) if not f]
    if len(prompts) < max(sizes):
        raise SystemExit(f"Only {len(prompts)} MBPP prompts are not refused; need {max(sizes)}.")
    print(
        f"SmolLM2-135M-Instruct, CPU ({torch.get_num_threads()} threads), KSD layers {method.config.layers} "
        f"alpha {method.config.alpha:.4f} window {method.config.window}, {args.new_tokens} new tokens, {args.repeats} interleaved repeats, medians"
    )
    print(
        f"{'batch':>5} {'bare tok/s':>11} {'KSD tok/s':>10} {'ratio':>7}   {'ratio per CPU-second':>20}   "
        f"{'end-to-end ratio':>16}   (ratios: medians of the per-repeat ratios)"
    )
    for size in sizes:
        batch = next(left_batches(tok, prompts[:size], batch_size=size))
        timed_generate(model, batch, args.new_tokens)  # warm-up
        timed_generate(unlearned, batch, args.new_tokens)
        speeds: dict[str, list[float]] = {"bare": [], "ksd": []}
        cpu: dict[str, list[float]] = {"bare": [], "ksd": []}
        e2e: dict[str, list[float]] = {"bare": [], "ksd": []}
        for r in range(args.repeats):
            order = [("bare", model), ("ksd", unlearned)]
            for name, m in order if r % 2 == 0 else order[::-1]:
                speed, cpu_speed, whole, out = timed_generate(m, batch, args.new_tokens)
                speeds[name].append(speed)
                cpu[name].append(cpu_speed)
                e2e[name].append(whole)
                if name == "bare":
                    reference = out
                else:
                    generated = out
            if not torch.equal(reference, generated):
                raise SystemExit(f"batch {size}: the unlearned model's output differs from the bare model's")
        bare, ksd = statistics.median(speeds["bare"]), statistics.median(speeds["ksd"])

        def paired(rates: dict[str, list[float]]) -> float:  # the repeats' own ratios: a slow spell hits both
            return statistics.median(k / b for k, b in zip(rates["ksd"], rates["bare"]))

        print(
            f"{size:>5} {bare:11.1f} {ksd:10.1f} {paired(speeds):7.3f}   {paired(cpu):20.3f}   {paired(e2e):16.3f}"
        )


if __name__ == "__main__":
    main()
