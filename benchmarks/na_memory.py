"""Memory of Neuron Adjust's random draws in a prefill (SmolLM2-135M-Instruct, CPU; issue 13, item 4).

A prefill of ``--batch`` x ``--tokens`` tokens through Neuron Adjust (random mode, fitted on GSM8K / MBPP train
texts at ``--ratio``). Printed:

* the thresholds the draws hold during the prefill, read from the attachment's own buffers at its last layer,
  against what one block for all layers would hold (the design before this change) and one layer's selection;
* how far memory in use (glibc's heap, or resident memory) rises above its start during the prefill, on the bare
  model and with Neuron Adjust attached (each in a fresh subprocess, logits of the last position only, sampled
  every millisecond), and the difference;
* the computed size of both designs for the issue's example, Llama-3-8B (32 layers of 14336) at 8 x 2048 tokens.

Usage:  python benchmarks/na_memory.py [--batch 8] [--tokens 2048] [--ratio 0.03] [--fit-items 16]
(the fit reads the first 64 tokens of each text: the selection is a realistic one, not a tuned one)
Check:  python benchmarks/na_memory.py --batch 1 --tokens 64 --fit-items 4
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unlearn_hf import NeuronAdjustConfig, UnlearnedModelForCausalLM  # noqa: E402
from unlearn_hf.context import current_context  # noqa: E402
from unlearn_hf.evaluation.skills import get_skill  # noqa: E402
from unlearn_hf.models import load_smollm2  # noqa: E402

MIB = 1 << 20


def build(args) -> tuple[UnlearnedModelForCausalLM, torch.Tensor]:
    model, tok = load_smollm2()
    gsm8k, mbpp = get_skill("gsm8k", args.data), get_skill("mbpp", args.data)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    unlearned.fit(
        NeuronAdjustConfig(ratio=args.ratio),
        gsm8k.probe_texts(args.fit_items),
        mbpp.probe_texts(args.fit_items),
        tok,
        max_length=64,
        show_progress=False,
    )
    ids = torch.randint(100, 40000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    return unlearned, ids


def prefill(model, ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
        )
    ] + [("keepcost", ctypes.c_size_t)]


def _heap_reader():
    """``() -> bytes in use`` from glibc's ``mallinfo2`` (allocated chunks + mmap-ed blocks: what tensors hold, not
    what the allocator keeps cached), or ``None`` where it is missing (then resident memory is read instead)."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def read() -> int:
        info = fn()
        return info.uordblks + info.hblkhd

    return read


class MemorySampler:
    """The most memory in use seen while the ``with`` block runs, sampled every millisecond by a thread: the heap
    in use (``mallinfo2``) where glibc has it, else resident memory (``/proc/self/statm``; it also counts pages the
    allocator keeps, so it swings by ~100 MiB between runs). ``ru_maxrss`` cannot tell a prefill's peak from the
    peak of loading the model."""

    def __init__(self) -> None:
        self.page = resource.getpagesize()
        self.heap = _heap_reader()
        self.source = "heap in use (mallinfo2)" if self.heap else "resident memory (statm)"
        self.peak = self.start = 0
        self._stop = threading.Event()

    def read(self) -> int:
        if self.heap is not None:
            return self.heap()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.read())

    def __enter__(self) -> MemorySampler:
        self.start = self.peak = self.read()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def child(args) -> None:
    unlearned, ids = build(args)
    if args.child == "bare":
        unlearned.remove_all_methods()
    prefill(unlearned, ids[:1, :16])  # warm up the kernels and allocator on a small call
    rises = []
    for _ in range(2):  # the second run is the one reported: the allocator has seen the shapes once
        with MemorySampler() as mem:
            prefill(unlearned, ids)
        rises.append(mem.peak - mem.start)
    print(json.dumps({"source": mem.source, "rise_mib": rises[-1] / MIB}))


def held_values(unlearned, ids: torch.Tensor) -> int:
    """The threshold values the draws hold at the last adjusted layer of the prefill."""
    attachment = unlearned.attachments["neuron_adjust"]
    last = max(attachment.layers)
    seen = []

    def record(module, inputs, output):
        draws = current_context().request.data["neuron_adjust"]
        seen.append(sum(b[0].numel() + (0 if b[1] is None else b[1].numel()) for b in draws.buffers.values()))

    handle = unlearned.ffl_sites[last].pre.register_forward_hook(record)
    try:
        prefill(unlearned, ids)
    finally:
        handle.remove()
    return seen[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--ratio", type=float, default=0.03)
    p.add_argument("--fit-items", type=int, default=16)
    p.add_argument("--child", choices=["bare", "na"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0

    unlearned, ids = build(args)
    attachment = unlearned.attachments["neuron_adjust"]
    counts = [adj.num_neurons for adj in attachment.layers.values()]
    rows, itemsize = ids.numel(), 4
    held = held_values(unlearned, ids)
    print(
        f"SmolLM2-135M-Instruct, prefill {args.batch} x {args.tokens}, Neuron Adjust ratio {args.ratio:g}: "
        f"{sum(counts)} neurons in {len(counts)} layers (largest layer {max(counts)})"
    )
    print(f"  thresholds held during the prefill: {held * itemsize / MIB:.1f} MiB ({held} values)")
    print(f"  one block for all layers would hold: {rows * sum(counts) * itemsize / MIB:.1f} MiB")
    print(f"  one layer's selection (the largest): {rows * max(counts) * itemsize / MIB:.1f} MiB")

    peaks = {}
    for kind in ("bare", "na"):
        cmd = [sys.executable, __file__, "--child", kind, *(argv or sys.argv[1:])]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        peaks[kind] = json.loads(out)
    rise = {k: v["rise_mib"] for k, v in peaks.items()}
    print(
        f"  {peaks['na']['source']} during the prefill (peak above its start, sampled every ms): bare "
        f"+{rise['bare']:.0f} "
        f"MiB, with Neuron Adjust +{rise['na']:.0f} MiB (difference {rise['na'] - rise['bare']:+.0f} MiB)"
    )
    k8b = round(0.03 * 32 * 14336)
    print(
        f"  computed for Llama-3-8B at 8 x 2048, ratio 0.03 ({k8b} neurons, evenly spread): all layers "
        f"{8 * 2048 * k8b * itemsize / MIB:.0f} MiB, one layer {8 * 2048 * (k8b / 32) * itemsize / MIB:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
