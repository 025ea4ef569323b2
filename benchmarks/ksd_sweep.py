"""Key Space Detection abstention rates on SmolLM2-135M-Instruct for several layers and alphas.

Fit: the forget queries' key statistics at every listed layer in one streaming probe pass (200 GSM8K train
questions by default). Evaluation: one forward per batch over GSM8K test, MBPP (test split) and MMLU questions,
recording each query's largest standardized distance at every listed layer; since α only moves the threshold
(inside iff max_d |v−μ|/σ ≤ α·k), every α comes from that single pass.

Usage: python benchmarks/ksd_sweep.py [--layers 5,10,15,20,25,29] [--alphas 0.8,0.9,1.0,1.1,1.25]
       [--fit 200] [--eval 100] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ksd_eval import (  # noqa: E402 - the same data and helpers as the integration test
    BATCH,
    MAX_LENGTH,
    by_length,
    eval_sets,
    gsm8k_questions,
    standardized_distances,
)
from unlearn_hf import probe  # noqa: E402
from unlearn_hf.data import DataSpec  # noqa: E402
from unlearn_hf.methods.key_space_detection import hypercube_radius  # noqa: E402
from unlearn_hf.models import load_smollm2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", default="5,10,15,20,25,29")
    parser.add_argument("--alphas", default="0.8,0.9,1.0,1.1,1.25")
    parser.add_argument("--fit", type=int, default=200, help="GSM8K train questions to fit on")
    parser.add_argument("--eval", type=int, default=100, help="questions per evaluation set")
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    alphas = [float(x) for x in args.alphas.split(",")]
    data = Path(args.data)

    model, tok = load_smollm2()
    forget = gsm8k_questions(data, "train", args.fit)
    forget = [forget[i] for i in by_length(tok, forget)]
    start = time.perf_counter()
    stats = probe(
        model,
        forget,
        tok,
        site="key",
        mode="last",
        layers=layers,
        spec=DataSpec(batch_size=BATCH, max_length=MAX_LENGTH),
        show_progress=False,
    )
    fitted = {}
    for i in layers:
        s = stats.layers[i]
        sd = s.std(args.eps)
        fitted[i] = (s.mean, sd, hypercube_radius(s.mean, sd, s.minimum, s.maximum))
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    sets = eval_sets(data, args.eval)
    z = {name: standardized_distances(model, tok, texts, fitted) for name, texts in sets.items()}
    eval_s = time.perf_counter() - start

    print(
        f"SmolLM2-135M-Instruct: fit on {len(forget)} GSM8K train questions ({fit_s:.0f} s), "
        f"{args.eval} questions per set ({eval_s:.0f} s). Abstention rate (inside the hypercube):"
    )
    print(f"{'layer':>5} {'k':>7} {'alpha':>6} " + " ".join(f"{name:>7}" for name in sets))
    for i in layers:
        for alpha in alphas:
            rates = " ".join(f"{(z[name][i] <= alpha).mean():7.0%}" for name in sets)
            print(f"{i:>5} {fitted[i][2]:7.2f} {alpha:6.2f} {rates}")


if __name__ == "__main__":
    main()
