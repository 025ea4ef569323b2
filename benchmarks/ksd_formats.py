"""Key Space Detection however the question is asked: fit on plain GSM8K questions (calibrated on MBPP train tasks
and MMLU dev questions), then measure abstention on held-out questions in every format a user sends.

Formats: the library's QA template, the bare question, the chat template (with the tokenizer's default system
turn, and with a system prompt the fit never saw), and instruction wordings the fit never saw (``unseen_*``).
Held-out sets: GSM8K test (to forget), MBPP test tasks, HumanEval prompts, MLQA-en questions, MMLU non-math
questions (to keep), and MMLU's math subjects (reported apart: abstaining there is forgetting math).

With ``--skip 100``, the held-out questions are the next ones in each set, which no choice of the calibration's
rules ever looked at, and four ``fresh_*`` wordings written after those choices are added (for every set: generic
wrappers, so false abstention is measured under them too).

Run: ``python -m benchmarks.ksd_formats [--n 100] [--skip 100] [--plot calibration.png]`` (prints a markdown table,
the fit time against today's single-template fit, and optionally plots the calibration table). The integration test
``tests/test_integration_ksd.py`` reads the same definitions.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM
from unlearn_hf.methods.key_space_detection.calibration import LIMIT_SHARE
from unlearn_hf.methods.key_space_detection.distances import pad_left

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
N_FIT = 200
BATCH, MAX_LENGTH = 16, 512
MATH_SUBJECTS = (
    "abstract_algebra",
    "college_mathematics",
    "elementary_mathematics",
    "high_school_mathematics",
    "high_school_statistics",
)
EVAL_SYSTEM = "You are a friendly assistant. Answer carefully and briefly."


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gsm8k(data: Path, split: str, n: int) -> list[str]:
    return [r["question"] for r in _jsonl(data / "gsm8k" / f"{split}.jsonl")[:n]]


def mbpp(data: Path, lo: int, hi: int, n: int) -> list[str]:
    rows = sorted(
        (r for r in _jsonl(data / "mbpp" / "mbpp.jsonl") if lo <= int(r["task_id"]) <= hi),
        key=lambda r: int(r["task_id"]),
    )
    return [r["text"].replace("\r\n", "\n") for r in rows[:n]]


def humaneval(data: Path, n: int) -> list[str]:
    with gzip.open(data / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()][:n]


def mlqa_en(data: Path, n: int) -> list[str]:
    """One question per paragraph (contexts cut to 600 characters), in file order."""
    with open(data / "mlqa" / "dev" / "dev-context-en-question-en.json", encoding="utf-8") as f:
        doc = json.load(f)
    out = []
    for article in doc["data"]:
        for p in article["paragraphs"]:
            out.append(f"Context: {p['context'][:600]}\nQuestion: {p['qas'][0]['question']}")
    return out[:n]


def mmlu(data: Path, split: str, n: int, math: bool) -> list[str]:
    """Questions with their choices, round-robin over the (math or non-math) subjects."""
    subjects = []
    for path in sorted((data / "mmlu" / split).glob("*.csv")):
        if (path.stem.rsplit("_", 1)[0] in MATH_SUBJECTS) != math:
            continue
        with open(path, encoding="utf-8", newline="") as f:
            subjects.append(
                [
                    r["question"] + "".join(f"\n{'ABCD'[j]}. {r[f'choice{j}']}" for j in range(4))
                    for r in csv.DictReader(f)
                ]
            )
    out, depth = [], 0
    while len(out) < n and depth < max(len(s) for s in subjects):
        for rows in subjects:
            if depth < len(rows) and len(out) < n:
                out.append(rows[depth])
        depth += 1
    return out


def fit_data(data: Path, n_fit: int = N_FIT) -> tuple[list[str], dict[str, list[str]]]:
    """Forget: GSM8K train questions; retain (calibration): MBPP train tasks and MMLU dev non-math questions."""
    return gsm8k(data, "train", n_fit), {
        "mbpp": mbpp(data, 601, 974, 100),
        "mmlu": mmlu(data, "dev", 100, math=False),
    }


def eval_sets(data: Path, n: int, skip: int = 0) -> dict[str, list[str]]:
    """``n`` held-out questions per set, after the first ``skip`` (``skip=100``: questions the calibration's rules
    were never chosen on, see ``--skip``)."""
    m = skip + n
    sets = {
        "gsm8k": gsm8k(data, "test", m),
        "mbpp": mbpp(data, 11, 510, m),
        "humaneval": humaneval(data, m),
        "mlqa_en": mlqa_en(data, m),
        "mmlu_other": mmlu(data, "test", m, math=False),
        "mmlu_math": mmlu(data, "test", m, math=True),
    }
    return {name: qs[skip:] for name, qs in sets.items()}


def formats(tok, fresh: bool = False) -> dict[str, Callable[[str], str]]:
    """``{name: question -> prompt text}``; chat renderings hold their special tokens as text. ``fresh``: also the
    ``fresh_*`` wordings, written after the calibration's rules were chosen and never used to choose anything."""

    def chat(q: str, system: str | None = None, prefix: str = "") -> str:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prefix + q}
        ]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    return {
        "qa": lambda q: f"Question: {q}\nAnswer:",
        "bare": lambda q: q,
        "chat": chat,
        "chat_system": lambda q: chat(q, EVAL_SYSTEM),
        "unseen_solve": lambda q: f"Solve this problem step by step.\n{q}\nSolution:",
        "unseen_think": lambda q: f"{q}\nLet's think step by step.",
        "unseen_qa": lambda q: f"Q: {q}\nA:",
        "unseen_here": lambda q: f"Here is a problem:\n{q}\n\nWhat is the answer?",
        "unseen_chat_instruction": lambda q: chat(q, None, "Please solve the following problem.\n"),
        **(
            {
                "fresh_alpaca": lambda q: f"### Instruction:\n{q}\n\n### Response:\n",
                "fresh_help": lambda q: f"Can you help me with this?\n\n{q}",
                "fresh_work": lambda q: f"Problem: {q}\nShow your work, then give the final answer.",
                "fresh_chat_tutor": lambda q: chat(
                    f"{q}\nHow do I work this out?", "You are a patient tutor."
                ),
            }
            if fresh
            else {}
        ),
    }


def token_ids(tok, text: str) -> list[int]:
    special = bool(tok.bos_token and text.startswith(tok.bos_token)) or text.startswith("<|im_start|>")
    return tok(text, add_special_tokens=not special)["input_ids"]


@torch.no_grad()
def abstention(unlearned, tok, questions: list[str], render: Callable[[str], str]) -> float:
    """Share of ``questions`` (rendered) on which ``unlearned`` abstains (``detect``, length-sorted batches)."""
    rows = [token_ids(tok, render(q)) for q in questions]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    flags = []
    for s in range(0, len(order), BATCH):
        ids, mask = pad_left([rows[i] for i in order[s : s + BATCH]], pad, MAX_LENGTH)
        flags.append(unlearned.detect(ids, mask))
    return float(torch.cat(flags).double().mean())


def measure(
    unlearned, tok, sets: dict[str, list[str]], format_names=None, fresh: bool = False
) -> dict[str, dict[str, float]]:
    """``{set: {format: abstention}}``: GSM8K in every format, the other sets in the known formats."""
    fmts = formats(tok, fresh)
    out = {}
    for name, qs in sets.items():
        names = format_names or (
            list(fmts) if name == "gsm8k" else [f for f in fmts if not f.startswith("unseen")]
        )
        out[name] = {f: abstention(unlearned, tok, qs, fmts[f]) for f in names}
    return out


def table(rates: dict[str, dict[str, float]]) -> str:
    cols = list(dict.fromkeys(f for r in rates.values() for f in r))
    lines = ["| set | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in rates.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.0f}%" if c in r else "" for c in cols) + " |")
    return "\n".join(lines)


def plot(method, path: str) -> None:
    """Forget vs. false abstention per layer and α, from the fitted method's calibration table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = method.state
    fig, ax = plt.subplots(figsize=(7, 5))
    cmap = plt.get_cmap("viridis")
    layers = st["calibration_layers"].tolist()
    for j, layer in enumerate(layers):
        ax.plot(
            st["calibration_false"][j],
            st["calibration_forget"][j],
            color=cmap(j / max(1, len(layers) - 1)),
            lw=2.5 if layer in method.config.layers else 0.8,
            label=f"layer {layer}" if layer in method.config.layers else None,
        )
    cal = method.config.calibration or {}
    if cal:  # the chosen set (one layer or several) is not one of the single-layer curves: its point
        ax.plot(
            max(cal["false_rate"].values()),
            sum(cal["forget_rate"].values()) / len(cal["forget_rate"]),
            "r*",
            ms=14,
            label=f"chosen: layers {method.config.layers}, α {method.config.alpha:.3f}",
        )
    budget = method.config.max_false_rate
    ax.axvline(budget, ls="--", color="grey", label="false-abstention budget")
    ax.axvline(budget * LIMIT_SHARE, ls=":", color="grey", label="limit on the calibration's own questions")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(left=0)
    ax.set_xlabel("false abstention (worst retain group, calibration)")
    ax.set_ylabel("held-out forget abstention (mean over renderings)")
    ax.set_title(f"KSD calibration: each single layer, α from 0.25 to 4 (window {method.config.window})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from unlearn_hf.models import load_smollm2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="held-out questions per set")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument(
        "--slack", type=int, default=None, help="max_window_slack of the config (default: its own)"
    )
    ap.add_argument(
        "--skip",
        type=int,
        default=0,
        help="skip the first N held-out questions of each set (100: the questions after those the calibration's "
        "rules were chosen on) and add the fresh_* wordings",
    )
    ap.add_argument("--plot", default=None, help="write the calibration plot here (needs matplotlib)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tok = load_smollm2()
    data = Path(args.data)
    forget, retain = fit_data(data)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    single = []
    for _ in range(2):  # the first run warms up (allocator, kernels); the faster one is the reference
        t0 = time.perf_counter()
        unlearned.fit(
            KeySpaceDetectionConfig(inputs="prompts", layers=None, alpha=1.0, window=1),
            [f"Question: {q}\nAnswer:" for q in forget],
            tokenizer=tok,
            name="single",
            show_progress=False,
        )
        single.append(time.perf_counter() - t0)
        unlearned.remove_method("single")
    t_single = min(single)
    t0 = time.perf_counter()
    config = (
        KeySpaceDetectionConfig()
        if args.slack is None
        else KeySpaceDetectionConfig(max_window_slack=args.slack)
    )
    method = unlearned.fit(config, forget, retain, tok, name="math", show_progress=False)
    t_cal = time.perf_counter() - t0
    print(
        f"chosen: layers {method.config.layers}, window {method.config.window}, alpha {method.config.alpha:.4f}"
    )
    print(f"calibration: {json.dumps(method.config.calibration)}")
    print(
        f"fit time: single-template fit {t_single:.1f}s, fit with renderings + calibration {t_cal:.1f}s "
        f"(ratio {t_cal / t_single:.2f})"
    )
    print(table(measure(unlearned, tok, eval_sets(data, args.n, args.skip), fresh=args.skip > 0)))
    if args.plot:
        plot(method, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
