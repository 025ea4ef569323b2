"""Speed of Neuron Adjust and Selective Pruning against the bare model (SmolLM2-135M-Instruct, CPU).

Both methods are fitted on all layers (forget: GSM8K train question + answer texts, retain: MBPP train task
+ code), from one probe of both FFL sites. Workloads: greedy ``generate`` of ``--new-tokens`` tokens
(``min_new_tokens`` equal, so every run makes the same number) at each batch size, from prompts of
``--prompt-len`` tokens of GSM8K test text (decode tokens/s after the prefill; end-to-end in the ``e2e``
column), and one forward over ``--forward-len`` tokens. Bare and unlearned runs are interleaved, the order
reversing each repeat (see ``benchmarks/common.py``); the ratio is the median of the per-repeat ratios.
Targets for Neuron Adjust at ratio 0.03: decode ≥ 0.97 of the bare model, forward ≥ 0.98 (the paper's public
code: 0.78). Threads: torch's default for the machine (printed), or ``--threads``. On a shared machine the
wall-clock rates swing with other processes (with 2 threads on 2 busy cores, by 10x); ``--threads 1`` and the
``cpu`` column (rates per second of this process's CPU time) are far steadier.

Usage:   python benchmarks/decode_speed.py [--repeats 5] [--batch-sizes 1 8] [--new-tokens 64] [--forward-len 512]
         [--na-ratio 0.03] [--sp-ratio 0.03] [--fit-items 64] [--deterministic] [--idle-hooks]
Check:   python benchmarks/decode_speed.py --repeats 1 --warmup 0 --batch-sizes 1 --new-tokens 4 --forward-len 32
         --fit-items 4
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    SpeedCase,
    compare_speed,
    format_results,
    token_stream,
    variant_of,
)
from unlearn_hf import (  # noqa: E402
    DataSpec,
    NeuronAdjustConfig,
    SelectivePruningConfig,
    UnlearnedModelForCausalLM,
    probe,
)
from unlearn_hf.evaluation.skills import get_skill  # noqa: E402
from unlearn_hf.models import load_smollm2  # noqa: E402

TARGETS = {"generate": 0.97, "forward": 0.98}  # issue 13


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", default=str(ROOT.parent / "shared" / "data"), help="folder of the skill data sets"
    )
    p.add_argument("--fit-items", type=int, default=64, help="GSM8K / MBPP train items to fit on")
    p.add_argument("--fit-max-length", type=int, default=256)
    p.add_argument("--na-ratio", type=float, default=0.03)
    p.add_argument("--sp-ratio", type=float, default=0.03)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--forward-len", type=int, default=512, help="0 skips the forward case")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--deterministic", action="store_true", help="also time Neuron Adjust in deterministic mode"
    )
    p.add_argument(
        "--idle-hooks", action="store_true", help="also time the bare model while Neuron Adjust is attached"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    gsm8k, mbpp = get_skill("gsm8k", args.data), get_skill("mbpp", args.data)
    print(
        f"SmolLM2-135M-Instruct ({model.dtype}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; the machine may be shared: compare ratios, not rates."
    )

    start = time.perf_counter()
    spec = DataSpec(batch_size=8, max_length=args.fit_max_length)
    kw = dict(site=("pre", "key"), spec=spec, show_progress=False)
    forget = probe(model, gsm8k.probe_texts(args.fit_items), tok, **kw)
    retain = probe(model, mbpp.probe_texts(args.fit_items), tok, **kw)
    variants = []
    na = UnlearnedModelForCausalLM.from_base(model)
    na.fit(NeuronAdjustConfig(ratio=args.na_ratio), forget["pre"], retain["pre"])
    na_methods = dict(na.methods)
    n_layers = len(set(na.methods["neuron_adjust"].state["layer_index"].tolist()))
    variants.append(variant_of(f"NA {args.na_ratio:g}", na))
    if args.deterministic:
        det = UnlearnedModelForCausalLM.from_base(model)
        det.fit(NeuronAdjustConfig(ratio=args.na_ratio, deterministic=True), forget["pre"], retain["pre"])
        variants.append(variant_of(f"NA {args.na_ratio:g} deterministic", det))
    sp = UnlearnedModelForCausalLM.from_base(model)
    sp.fit(SelectivePruningConfig(ratio=args.sp_ratio), forget["key"], retain["key"])
    variants.append(variant_of(f"SP {args.sp_ratio:g}", sp))
    if args.idle_hooks:
        idle = variant_of(
            f"NA {args.na_ratio:g} idle, base called", UnlearnedModelForCausalLM.from_base(model)
        )
        idle.methods, idle.call_base = na_methods, True
        variants.append(idle)
    print(
        f"fitted in {time.perf_counter() - start:.0f} s on {args.fit_items} + {args.fit_items} items; "
        f"Neuron Adjust hooks {n_layers} of {len(na.ffl_sites)} layers"
    )

    cases = [
        SpeedCase(
            f"decode b{b}", "generate", batch_size=b, new_tokens=args.new_tokens, prompt_len=args.prompt_len
        )
        for b in args.batch_sizes
    ]
    if args.forward_len:
        cases.append(SpeedCase(f"forward {args.forward_len}", "forward", seq_len=args.forward_len))
    stream = token_stream(tok, [it.text for it in gsm8k.eval_items(100)])
    results = compare_speed(
        model,
        variants,
        cases,
        stream,
        repeats=args.repeats,
        warmup=args.warmup,
        pad_token_id=tok.pad_token_id,
        log=print,
    )
    print()
    print(format_results(results))
    print()
    na_name = variants[0].name
    for res in results:
        if res.variant == na_name:
            target = TARGETS[res.case.kind]
            verdict = "ok" if res.ratio() >= target else "BELOW"
            print(
                f"{na_name} {res.case.name}: ratio {res.ratio():.3f} (target >= {target}) {verdict}; "
                f"per CPU second {res.ratio('cpu tok/s'):.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
