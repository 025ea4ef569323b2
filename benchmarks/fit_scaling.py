"""Fitting wall time on 1 vs 2 CPU processes (data-parallel probing) over the same SmolLM2 data, in one run.

Launches the fits of Neuron Adjust, Selective Pruning and Key Space Detection on SmolLM2-135M-Instruct
(GSM8K forget, MBPP retain) as:

* 1 process with ``T`` intra-op threads (plain ``python``, no process group);
* 2 processes with ``T / 2`` threads each (``torchrun --nproc_per_node 2``, gloo): each probes half the batches;
* with ``--single-thread-baseline``, also 1 process with ``T / 2`` threads (the per-process speed-up).

``T`` is ``--threads`` (default: all cores). The processes share the same cores, so on a 2-core machine the gain
over one 2-thread process is bounded (intra-op threading already uses both cores; data parallelism saves its
synchronisation and small-matrix inefficiency). Fit time is measured inside the workers between barriers
(model loading and process start are excluded and reported apart as the launch total). The fitted states are
compared: selected neurons and KSD layers must be identical; the float differences are printed.

Usage: python benchmarks/fit_scaling.py [--forget 64] [--retain 64] [--queries 64] [--batch-size 8]
       [--max-length 256] [--threads 2] [--single-thread-baseline] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path, n: int | None = None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows if n is None else rows[:n]


def load_data(data_dir: Path, n_forget: int, n_retain: int, n_queries: int) -> dict[str, list[str]]:
    gsm8k = read_jsonl(data_dir / "gsm8k" / "train.jsonl", max(n_forget, n_queries))
    mbpp = [r for r in read_jsonl(data_dir / "mbpp" / "mbpp.jsonl") if r["task_id"] >= 601][:n_retain]
    return {
        "forget": [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in gsm8k[:n_forget]],
        "retain": [f"{r['text']}\n{r['code']}".replace("\r\n", "\n") for r in mbpp],
        "queries": [f"Question: {r['question']}\nAnswer:" for r in gsm8k[:n_queries]],
    }


# -- worker (one process of one configuration) -------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from unlearn_hf import (
        KeySpaceDetectionConfig,
        NeuronAdjustConfig,
        SelectivePruningConfig,
        UnlearnedModelForCausalLM,
    )
    from unlearn_hf.distributed import get_rank, get_world_size
    from unlearn_hf.models import load_smollm2

    torch.set_num_threads(args.threads)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    model, tokenizer = load_smollm2()
    data = load_data(args.data, args.forget, args.retain, args.queries)
    with torch.no_grad():  # warm-up: first-call allocations are not part of the fit
        model(**tokenizer(data["forget"][:2], return_tensors="pt", padding=True))
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    kw = dict(batch_size=args.batch_size, max_length=args.max_length, show_progress=False)
    fits = {
        "neuron_adjust": (NeuronAdjustConfig(ratio=0.03), data["forget"], data["retain"]),
        "selective_pruning": (SelectivePruningConfig(ratio=0.03), data["forget"], data["retain"]),
        "key_space_detection": (KeySpaceDetectionConfig(), data["queries"], None),
    }
    times, tensors = {}, {}
    for name, (config, forget, retain) in fits.items():
        barrier()
        start = time.perf_counter()
        method = unlearned.fit(config, forget, retain, tokenizer, **kw)
        barrier()
        times[name] = time.perf_counter() - start
        tensors.update({f"{name}.{k}": v for k, v in method.state_dict().items()})
    rank = get_rank()
    out = Path(args.out)
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    info = {"times": times, "world_size": get_world_size(), "threads": torch.get_num_threads()}
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    if dist.is_initialized():
        dist.destroy_process_group()


# -- parent: launch the configurations and compare ---------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, procs: int, threads: int, out: Path) -> float:
    out.mkdir(parents=True)
    worker_args = [
        str(Path(__file__).resolve()),
        "--worker",
        "--out",
        str(out),
        "--threads",
        str(threads),
        "--data",
        str(args.data),
        *("--forget", str(args.forget), "--retain", str(args.retain), "--queries", str(args.queries)),
        *("--batch-size", str(args.batch_size), "--max-length", str(args.max_length)),
    ]
    if procs == 1:
        cmd = [sys.executable, *worker_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> tuple[bool, float]:
    """(integer tensors identical, max over float tensors of max |a - b| / max |a|)."""
    same, worst = set(ref) == set(got), 0.0
    for key, a in ref.items():
        b = got[key]
        if a.shape != b.shape:
            return False, float("inf")
        if a.is_floating_point():
            a64, b64 = a.double(), b.double()
            rel = ((a64 - b64).abs().max() / a64.abs().max().clamp_min(1e-300)).item() if a.numel() else 0.0
            worst = max(worst, rel)
        else:
            same &= torch.equal(a, b)
    return same, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forget", type=int, default=64)
    parser.add_argument("--retain", type=int, default=64)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="total threads T")
    parser.add_argument("--single-thread-baseline", action="store_true")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from safetensors.torch import load_file

    from unlearn_hf.models import load_smollm2

    load_smollm2()  # make sure the cached conversion exists before several processes load it
    half = max(1, args.threads // 2)
    configs = [("1 process", 1, args.threads), ("2 processes", 2, half)]
    if args.single_thread_baseline:
        configs.append(("1 process (baseline)", 1, half))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, procs, threads in configs:
            out = Path(tmp) / f"p{procs}t{threads}"
            total = launch(args, procs, threads, out)
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]
            states = [load_file(str(out / f"rank{r}.safetensors")) for r in range(procs)]
            identical_ranks = all(compare(states[0], s) == (True, 0.0) for s in states[1:])
            results[label] = (procs, threads, ranks[0]["times"], total, states[0], identical_ranks)

    print(
        f"SmolLM2-135M-Instruct, {args.forget} forget / {args.retain} retain / {args.queries} queries, "
        f"batch {args.batch_size}, max_length {args.max_length}, {os.cpu_count()} CPU cores"
    )
    ref_label = configs[0][0]
    names = list(results[ref_label][2])
    print(f"{'configuration':<24}{'threads':>8}" + "".join(f"{n:>22}" for n in names) + f"{'fit total':>12}")
    for label, (procs, threads, times, total, _, _) in results.items():
        fit_total = sum(times.values())
        row = f"{label:<24}{f'{procs}x{threads}':>8}" + "".join(f"{times[n]:>21.2f}s" for n in names)
        print(row + f"{fit_total:>11.2f}s   (launch total {total:.1f} s)")
    print()
    pairs = [("2 processes", ref_label)]
    if args.single_thread_baseline:
        pairs.append(("2 processes", "1 process (baseline)"))
    for label, base in pairs:
        _, _, times, _, state, identical = results[label]
        same, worst = compare(results[base][4], state)
        speed = sum(results[base][2].values()) / sum(times.values())
        print(
            f"{label} vs {base}: fit speed-up {speed:.2f}x; selected neurons / layers identical: {same}; "
            f"max relative float difference {worst:.1e}; both ranks bit-identical: {identical}"
        )


if __name__ == "__main__":
    main()
