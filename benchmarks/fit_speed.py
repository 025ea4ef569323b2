"""Fit speed of Neuron Adjust, Selective Pruning and Key Space Detection against plain forwards, in one run.

SmolLM2-135M-Instruct; forget: GSM8K train (question + answer for NA/SP, questions for KSD), retain: MBPP
train (task + code for NA/SP, tasks for KSD's calibration). Each fit runs with the library's defaults
(``max_batch_tokens`` of the device, no ``batch_size``). While it runs, every forward's real token rows are
recorded, and over exactly those rows the benchmark then times:

* **batch-1**: a ``no_grad`` loop of one full forward (with the LM head) per row, the paper's procedure;
* **best batched**: the backbone (no LM head: a probe needs none) over length-sorted batches of each token
  budget of ``--budgets``, the fastest kept: what a hand-written batched probe could reach.

With ``--check-stats N`` it also probes the first ``N`` NA/SP texts one by one (``batch_size=1``) and with the
default budget, and prints the largest difference of the float64 means and variances (relative to the
one-by-one value's scale) and whether Neuron Adjust selects the same neurons from both.

It prints, per method: rows, tokens, fit seconds, tokens/s, the fit's padding fraction, and the speed-ups
``batch-1 / fit`` (target ≥ 1.25 on CPU) and ``fit / best batched`` (target ≥ 0.95, as a speed ratio), plus
the best budget's padding. Every repeat runs every workload in turn (the order reversing from one repeat to the next); each timing is
the median over ``--repeats``; ``best/fit`` is also printed per repeat (that repeat's fastest budget over its fit:
paired in time, so drift between repeats cancels), and as a ratio of this process's CPU seconds (time that other
processes take from the cores does not count; a shared machine's wall-clock ratios swing by ±0.05 from run to
run). Results also go to ``--out`` (JSON).

Usage: python benchmarks/fit_speed.py [--n 200] [--threads 2] [--repeats 1] [--budgets 512,1024,2048,4096]
       [--methods neuron_adjust,selective_pruning,key_space_detection] [--check-stats 0] [--data ../shared/data] [--out benchmarks/fit_speed.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from unlearn_hf import (
    KeySpaceDetectionConfig,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
    probe,
)
from unlearn_hf.batch_plan import plan_batches
from unlearn_hf.data import DataSpec
from unlearn_hf.methods.neuron_adjust import NeuronAdjust
from unlearn_hf.models import load_smollm2

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_data(data_dir: Path, n: int) -> dict[str, list[str]]:
    gsm8k = read_jsonl(data_dir / "gsm8k" / "train.jsonl")[:n]
    mbpp = [r for r in read_jsonl(data_dir / "mbpp" / "mbpp.jsonl") if r["task_id"] >= 601][:n]
    return {
        "forget": [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in gsm8k],
        "retain": [f"{r['text']}\n{r['code']}".replace("\r\n", "\n") for r in mbpp],
        "questions": [r["question"] for r in gsm8k],
        "tasks": [r["text"] for r in mbpp],
    }


def padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def batch1_loop(model, rows: list[list[int]]) -> float:
    start = time.perf_counter()
    for r in rows:
        model(input_ids=torch.tensor([r]), use_cache=False)
    return time.perf_counter() - start


@torch.no_grad()
def batched_backbone(model, rows: list[list[int]], budget: int, pad_id: int) -> tuple[float, float]:
    """Seconds and padding fraction of the backbone over length-sorted batches of ``budget`` tokens."""
    plan = plan_batches([len(r) for r in rows], max_batch_tokens=budget)
    batches = [padded([rows[i] for i in b], pad_id) for b in plan]
    real = sum(int(m.sum()) for _, m in batches)
    total = sum(m.numel() for _, m in batches)
    start = time.perf_counter()
    for ids, mask in batches:
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return time.perf_counter() - start, 1 - real / total


class RowRecorder:
    """Records the real token rows and the padded size of every forward of the backbone while it is active."""

    def __init__(self, model) -> None:
        self.rows: list[list[int]] = []
        self.real = self.total = 0
        self.model = model

    def record(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.total += ids.numel()
        for i, row in enumerate(ids):
            r = row.tolist() if mask is None else row[mask[i].bool()].tolist()
            self.rows.append(r)
            self.real += len(r)

    def __enter__(self) -> RowRecorder:
        self.handle = self.model.model.register_forward_pre_hook(self.record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def record_rows(model, tokenizer, config, forget, retain) -> RowRecorder:
    """The rows of one (untimed) fit."""
    with RowRecorder(model) as recorder:
        unlearned = UnlearnedModelForCausalLM.from_base(model)
        unlearned.fit(config, forget, retain, tokenizer, show_progress=False)
        unlearned.remove_all_methods()
    return recorder


def time_fit(model, tokenizer, config, forget, retain) -> float:
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    start = time.perf_counter()
    unlearned.fit(config, forget, retain, tokenizer, show_progress=False)
    elapsed = time.perf_counter() - start
    unlearned.remove_all_methods()
    return elapsed


def check_statistics(model, tokenizer, forget: list[str], retain: list[str]) -> dict[str, float | bool]:
    """Statistics of a one-by-one probe against the default token-budget batches (see the module docstring)."""
    out: dict[str, float | bool] = {"mean": 0.0, "variance": 0.0}
    stats = {}
    for label, spec in (("one", DataSpec(batch_size=1)), ("budget", DataSpec())):
        stats[label] = [
            probe(model, d, tokenizer, site="pre", spec=spec, show_progress=False) for d in (forget, retain)
        ]
    for one, budget in zip(stats["one"], stats["budget"]):
        for i, a in one.layers.items():
            b = budget.layers[i]
            scale = a.std().clamp_min(1e-12)
            out["mean"] = max(out["mean"], float(((a.mean - b.mean).abs() / scale).max()))
            out["variance"] = max(
                out["variance"], float(((a.variance - b.variance).abs() / a.variance).max())
            )
    config = NeuronAdjustConfig(ratio=0.03)
    layers = list(range(len(stats["one"][0].layers)))
    picks = [NeuronAdjust.from_statistics(config, layers, *stats[k], 0.03).state for k in ("one", "budget")]
    out["same_selection"] = all(
        torch.equal(picks[0][k], picks[1][k]) for k in ("layer_index", "neuron_index")
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="GSM8K and MBPP examples each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--budgets", default="512,1024,2048,4096")
    parser.add_argument(
        "--check-stats", type=int, default=0, help="texts of each set for the statistics check"
    )
    parser.add_argument(
        "--methods",
        type=lambda v: v.split(","),
        default=["neuron_adjust", "selective_pruning", "key_space_detection"],
        help="comma-separated methods to fit",
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "fit_speed.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = load_data(args.data, args.n)
    budgets = [int(b) for b in args.budgets.split(",")]
    with torch.no_grad():  # warm-up: first-call allocations are not part of any timing
        model(**tokenizer(data["forget"][:2], return_tensors="pt", padding=True))
    fits = {
        "neuron_adjust": (NeuronAdjustConfig(ratio=0.03), data["forget"], data["retain"]),
        "selective_pruning": (SelectivePruningConfig(ratio=0.03), data["forget"], data["retain"]),
        "key_space_detection": (KeySpaceDetectionConfig(), data["questions"], data["tasks"]),
    }
    unknown = sorted(set(args.methods) - set(fits))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose among {sorted(fits)}")
    fits = {name: fit for name, fit in fits.items() if name in args.methods}
    recorded = {name: record_rows(model, tokenizer, *fit) for name, fit in fits.items()}
    row_sets: dict[tuple, list[list[int]]] = {}  # NA and SP read the same rows: their baselines are shared
    row_key = {}
    for name, rec in recorded.items():
        row_key[name] = tuple(map(tuple, rec.rows))
        row_sets.setdefault(row_key[name], rec.rows)
    # every repeat runs every workload in turn, the order reversing from one repeat to the next, so that a
    # noisy machine slows them alike; medians over the repeats
    jobs = [("fit", name) for name in fits]
    jobs += [("batch1", k) for k in row_sets] + [(b, k) for k in row_sets for b in budgets]
    times: dict[tuple, list[float]] = {job: [] for job in jobs}
    cpu: dict[tuple, list[float]] = {job: [] for job in jobs}  # this process's CPU seconds per job
    padding: dict[tuple, float] = {}
    for r in range(args.repeats):
        for job in jobs if r % 2 == 0 else jobs[::-1]:
            kind, what = job
            cpu_start = time.process_time()
            if kind == "fit":
                times[job].append(time_fit(model, tokenizer, *fits[what]))
            elif kind == "batch1":
                times[job].append(batch1_loop(model, row_sets[what]))
            else:
                elapsed, padding[job] = batched_backbone(model, row_sets[what], kind, pad_id)
                times[job].append(elapsed)
            cpu[job].append(time.process_time() - cpu_start)
    med = {job: statistics.median(t) for job, t in times.items()}
    report = {
        "threads": args.threads,
        "n": args.n,
        "budgets": budgets,
        "repeats": args.repeats,
        "methods": {},
    }
    for name, rec in recorded.items():
        key = row_key[name]
        best = min(budgets, key=lambda b: med[(b, key)])
        fit_s = med[("fit", name)]
        report["methods"][name] = {
            "rows": len(rec.rows),
            "tokens": rec.real,
            "fit_s": fit_s,
            "fit_tokens_per_s": rec.real / fit_s,
            "fit_padding": 1 - rec.real / rec.total,
            "batch1_s": med[("batch1", key)],
            "best_batched_s": med[(best, key)],
            "best_budget": best,
            "best_padding": padding[(best, key)],
            "speedup_vs_batch1": med[("batch1", key)] / fit_s,
            "speed_vs_best_batched": med[(best, key)] / fit_s,
            "per_budget_s": {str(b): med[(b, key)] for b in budgets},
            "fit_s_runs": times[("fit", name)],
            # CPU seconds of this process (time other processes take from the cores does not count)
            "speed_vs_best_batched_cpu": min(statistics.median(cpu[(b, key)]) for b in budgets)
            / statistics.median(cpu[("fit", name)]),
            "speed_vs_best_batched_cpu_runs": [
                min(cpu[(b, key)][r] for b in budgets) / cpu[("fit", name)][r] for r in range(args.repeats)
            ],
            # paired in time: each repeat's fastest budget over that repeat's fit (drift between repeats cancels)
            "speed_vs_best_batched_runs": [
                min(times[(b, key)][r] for b in budgets) / times[("fit", name)][r]
                for r in range(args.repeats)
            ],
        }
    if args.check_stats:
        n = args.check_stats
        report["statistics_check"] = check_statistics(
            model, tokenizer, data["forget"][:n], data["retain"][:n]
        )
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"SmolLM2-135M-Instruct, CPU, {args.threads} threads, {args.n} GSM8K + {args.n} MBPP train examples"
    )
    print(
        f"{'method':22s} {'rows':>5s} {'tokens':>7s} {'fit s':>7s} {'tok/s':>7s} {'pad':>6s} "
        f"{'b1 s':>7s} {'best s':>7s} {'budget':>6s} {'b1/fit':>7s} {'best/fit':>8s}"
    )
    for name, r in report["methods"].items():
        print(
            f"{name:22s} {r['rows']:5d} {r['tokens']:7d} {r['fit_s']:7.1f} {r['fit_tokens_per_s']:7.0f} "
            f"{r['fit_padding']:6.1%} {r['batch1_s']:7.1f} {r['best_batched_s']:7.1f} {r['best_budget']:6d} "
            f"{r['speedup_vs_batch1']:7.2f} {r['speed_vs_best_batched']:8.2f}  per repeat "
            + " ".join(f"{x:.3f}" for x in r["speed_vs_best_batched_runs"])
            + f"; CPU time {r['speed_vs_best_batched_cpu']:.2f}, per repeat "
            + " ".join(f"{x:.3f}" for x in r["speed_vs_best_batched_cpu_runs"])
        )
    if "statistics_check" in report:
        c = report["statistics_check"]
        print(
            f"statistics, one by one vs budget batches ({args.check_stats} + {args.check_stats} texts): largest mean "
            f"difference {c['mean']:.2e} std, variance {c['variance']:.2e} relative; same NA selection: "
            f"{c['same_selection']}"
        )


if __name__ == "__main__":
    main()
