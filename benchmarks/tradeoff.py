"""Forget drop against retain drop of Neuron Adjust and Selective Pruning over a grid of ratios, on SmolLM2-135M-Instruct
with real data (issue 13, item 1).

Forget GSM8K, retain MBPP: the neuron statistics of each variant are probed once (GSM8K train / MBPP train texts)
and the neurons re-selected for every ratio, so a point costs one evaluation, not one probe. Scores are the demo's
teacher-forced answer-token accuracy on held-out items (GSM8K test, MBPP test tasks); a drop is relative to the
bare model measured in the same run: ``(base - method) / base``.

Variants: NA probing every token (the default) or only the answer tokens (``tokens="completion"``), each ranking
``score``, random (default) or ``deterministic`` replacement, a third of the layers (``layers``: the ratio is then
of those layers' neurons; their statistics are the all-layer probe's, restricted); SP on every token and on answer
tokens.

Run: ``python -m benchmarks.tradeoff [--n-probe 200] [--n-eval 50] [--ratios ...] [--json tradeoff.json]
[--plot tradeoff.png]``. Prints a markdown table per variant.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from unlearn_hf import NeuronAdjustConfig, SelectivePruningConfig, UnlearnedModelForCausalLM
from unlearn_hf.data import DataSpec
from unlearn_hf.evaluation import get_skill
from unlearn_hf.evaluation.runner import evaluate_skill
from unlearn_hf.methods.fitting import probe_forget_and_retain
from unlearn_hf.methods.registry import method_class
from unlearn_hf.models import load_smollm2
from unlearn_hf.stats import SiteStatistics

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RATIOS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3)

#: name -> (method config class, config keywords, probed site, token mode)
VARIANTS = {
    "NA": (NeuronAdjustConfig, {}, "pre", "all"),
    "NA answer tokens": (NeuronAdjustConfig, {"tokens": "completion"}, "pre", "completion"),
    "NA deterministic": (NeuronAdjustConfig, {"deterministic": True}, "pre", "all"),
    "NA abs_mean_diff": (NeuronAdjustConfig, {"score": "abs_mean_diff"}, "pre", "all"),
    "NA standardized": (NeuronAdjustConfig, {"score": "standardized"}, "pre", "all"),
    # layer ranges of SmolLM2's 30 layers: the first, middle and last third
    "NA layers 0-9": (NeuronAdjustConfig, {"layers": list(range(0, 10))}, "pre", "all"),
    "NA layers 10-19": (NeuronAdjustConfig, {"layers": list(range(10, 20))}, "pre", "all"),
    "NA layers 20-29": (NeuronAdjustConfig, {"layers": list(range(20, 30))}, "pre", "all"),
    "SP": (SelectivePruningConfig, {}, "key", "all"),
    "SP answer tokens": (SelectivePruningConfig, {"tokens": "completion"}, "key", "completion"),
}


def scores(model, tok, skills, n_eval: int) -> dict[str, float]:
    return {s.name: evaluate_skill(model, tok, s, n_eval, batch_size=8).score for s in skills}


def drop(base: float, value: float) -> float:
    return (base - value) / base if base else float("nan")


def run(args: argparse.Namespace) -> dict:
    model, tok = load_smollm2()
    model.eval()
    forget, retain = get_skill("gsm8k", args.data_dir), get_skill("mbpp", args.data_dir)
    skills = [forget, retain]
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    base = scores(unlearned, tok, skills, args.n_eval)
    logging.info("base: %s", base)
    data = {
        "all": (forget.probe_texts(args.n_probe), retain.probe_texts(args.n_probe)),
        "completion": (forget.probe_pairs(args.n_probe), retain.probe_pairs(args.n_probe)),
    }
    probed: dict[tuple[str, str], tuple] = {}
    out = {
        "base": base,
        "ratios": list(args.ratios),
        "variants": {},
        # no machine paths: the data folder is named by its source, output paths are not recorded
        "settings": {
            "n_probe": args.n_probe,
            "n_eval": args.n_eval,
            "variants": list(args.variants),
            "data_dir": "../shared/data" if args.data_dir == DATA else args.data_dir.name,
        },
    }
    for name in args.variants:
        config_cls, kw, site, tokens = VARIANTS[name]
        key = (site, tokens)
        if key not in probed:
            start = time.perf_counter()
            spec = DataSpec(
                text_column="text",
                prompt_column="prompt" if tokens == "completion" else None,
                completion_column="completion" if tokens == "completion" else None,
                batch_size=8,
            )
            config = config_cls(**{k: v for k, v in kw.items() if k != "layers"})  # all layers, cached
            _, f, r = probe_forget_and_retain(
                unlearned,
                config,
                *data[tokens],
                tok,
                site=site,
                statistics=method_class(config.method_type).statistics,  # what the method's own fit keeps
                spec=spec,
                show_progress=False,
                label=name,
            )
            probed[key] = (f, r, spec)
            logging.info("probed %s in %.0f s", key, time.perf_counter() - start)
        f, r, spec = probed[key]
        if (
            kw.get("layers") is not None
        ):  # the same probe, restricted: what probing only those layers computes
            f, r = (
                SiteStatistics(st.site, st.mode, {i: st.layers[i] for i in kw["layers"]}, st.architecture_id)
                for st in (f, r)
            )
        rows = []
        for ratio in args.ratios:
            config = config_cls(**{**kw, "ratio": ratio})
            unlearned.fit(config, f, r, tok, name="m", show_progress=False)
            try:
                got = scores(unlearned, tok, skills, args.n_eval)
            finally:
                unlearned.remove_method("m")
            rows.append({"ratio": ratio, **{f"{s}_drop": drop(base[s], got[s]) for s in got}, "scores": got})
            logging.info(
                "%s ratio %s: %s",
                name,
                ratio,
                {k: round(v, 3) for k, v in rows[-1].items() if k.endswith("drop")},
            )
        out["variants"][name] = rows
        if args.json:  # after every variant: a long run that is stopped keeps what it measured
            Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return out


def table(result: dict) -> str:
    lines = ["| variant | ratio | GSM8K drop | MBPP drop |", "|---|---|---|---|"]
    for name, rows in result["variants"].items():
        for row in rows:
            lines.append(
                f"| {name} | {row['ratio']} | {100 * row['gsm8k_drop']:.1f}% | {100 * row['mbpp_drop']:.1f}% |"
            )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, rows in result["variants"].items():
        ax.plot(
            [100 * r["mbpp_drop"] for r in rows],
            [100 * r["gsm8k_drop"] for r in rows],
            marker="o" if name.startswith("NA") else "s",
            ls="-" if name.startswith("NA") else "--",
            label=name,
        )
    ax.axvline(10, color="grey", ls=":", label="10% retain budget")
    ax.set_xlabel("MBPP relative drop (%), retain")
    ax.set_ylabel("GSM8K relative drop (%), forget")
    ax.set_title("SmolLM2-135M-Instruct: forget vs retain over the ratio grid")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--n-probe", type=int, default=200)
    parser.add_argument("--n-eval", type=int, default=50)
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=list(RATIOS))
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write the Pareto plot (PNG) here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
