"""lm-evaluation-harness on SmolLM2-135M-Instruct unlearned by Key Space Detection: accuracy and abstention of the
base and the unlearned model, in the QA template and through lm-eval's ``--apply_chat_template``.

Tasks (local multiple choice, written as lm-eval YAML + JSON Lines): the first ``n`` GSM8K test questions (the
forget skill; the gold answer and three numeric distractors, the gold at position ``i % 4``), ``n`` MMLU test
questions of the non-math subjects (to keep) and of the math subjects (reported apart: abstaining there is
forgetting math), round-robin over the subjects. Prompts ``Question: …\\nAnswer:`` (MMLU with its lettered choices).

KSD fits: ``fixed`` (the integration test's: 100 plain GSM8K train questions, layer 20, α = 1, no calibration)
or ``default`` (``KeySpaceDetectionConfig()`` on 200 plain GSM8K train questions, calibrated on MBPP train tasks
and MMLU dev questions, as ``benchmarks/ksd_formats.py``).

Run: ``python -m benchmarks.lm_eval_formats [--n 40] [--ksd fixed|default] [--json out.json]``.
``tests/test_integration_lm_eval.py`` reads the same task definitions.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.ksd_formats import MATH_SUBJECTS, fit_data, gsm8k

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

MC_METRICS = """metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
MC_BODY = "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\ntarget_delimiter: ' '\n"


def write_task(folder: Path, name: str, docs: list[dict], body: str) -> Path:
    """An lm-eval task ``name`` over ``docs`` (JSON Lines beside the YAML); returns the YAML's path."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    path = folder / f"{name}.yaml"
    path.write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}",
        encoding="utf-8",
    )
    return path


def gsm8k_mc(folder: Path, data: Path, n: int) -> Path:
    docs = []
    with open(data / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()][:n]
    for i, r in enumerate(rows):
        gold = int(r["answer"].split("####")[-1].strip().replace(",", ""))
        wrong, g = [gold + 1, 2 * gold + 2, gold + 10], i % 4
        docs.append(
            {
                "question": r["question"],
                "choices": [str(c) for c in wrong[:g] + [gold] + wrong[g:]],
                "answer": g,
            }
        )
    body = "doc_to_text: 'Question: {{question}}\\nAnswer:'\n" + MC_BODY + MC_METRICS
    return write_task(folder, "gsm8k_mc", docs, body)


def mmlu_mc(folder: Path, data: Path, n: int, math: bool) -> Path:
    """``n`` (math or non-math) MMLU test questions, round-robin over the subjects (sorted by file name): the first
    question of every subject, then the second, ..."""
    subjects = []
    for path in sorted((data / "mmlu" / "test").glob("*.csv")):
        if (path.stem.rsplit("_", 1)[0] in MATH_SUBJECTS) == math:
            with open(path, encoding="utf-8", newline="") as f:
                subjects.append(list(csv.DictReader(f)))
    docs, depth = [], 0
    while len(docs) < n and depth < max(len(rows) for rows in subjects):
        for rows in subjects:
            if depth < len(rows) and len(docs) < n:
                r = rows[depth]
                docs.append({"question": r["question"], **{k: r[f"choice{i}"] for i, k in enumerate("ABCD")}})
                docs[-1].update(choices=["A", "B", "C", "D"], answer=int(r["answer"]))
        depth += 1
    body = "doc_to_text: 'Question: {{question}}\\nA. {{A}}\\nB. {{B}}\\nC. {{C}}\\nD. {{D}}\\nAnswer:'\n"
    return write_task(folder, "mmlu_math_mc" if math else "mmlu_other_mc", docs, body + MC_BODY + MC_METRICS)


def tasks(folder: Path, data: Path = DATA, n: int = 40) -> dict[str, Path]:
    return {
        "gsm8k_mc": gsm8k_mc(folder, data, n),
        "mmlu_other_mc": mmlu_mc(folder, data, n, math=False),
        "mmlu_math_mc": mmlu_mc(folder, data, n, math=True),
    }


def evaluate(lm, paths: list[Path], chat: bool) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=lm,
        tasks=[str(p) for p in paths],
        task_manager=TaskManager(include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        apply_chat_template=chat,
    )


def main() -> None:
    from lm_eval.models.huggingface import HFLM

    from unlearn_hf import KeySpaceDetectionConfig, UnlearnedModelForCausalLM
    from unlearn_hf.integrations.lm_eval.model import UnlearnedLM
    from unlearn_hf.models import load_smollm2

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="documents per task")
    ap.add_argument("--ksd", choices=("fixed", "default"), default="fixed")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    model, tok = load_smollm2()
    data = Path(args.data)
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    t0 = time.perf_counter()
    if args.ksd == "fixed":
        config = KeySpaceDetectionConfig(layers=[20], alpha=1.0)
        unlearned.fit(config, gsm8k(data, "train", 100), tokenizer=tok, show_progress=False)
    else:
        forget, retain = fit_data(data)
        unlearned.fit(KeySpaceDetectionConfig(), forget, retain, tok, show_progress=False)
    fit_s = time.perf_counter() - t0
    method = next(iter(unlearned.methods.values()))
    with tempfile.TemporaryDirectory() as tmp:
        paths = tasks(Path(tmp), data, args.n)
        rows: dict[str, dict] = {}
        for fmt, chat in (("qa", False), ("chat", True)):
            base = evaluate(
                HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size), list(paths.values()), chat
            )
            lm = UnlearnedLM(pretrained=unlearned, tokenizer=tok, batch_size=args.batch_size)
            out = evaluate(lm, list(paths.values()), chat)
            for name in paths:
                rows[f"{name} [{fmt}]"] = {
                    "base_acc": base["results"][name]["acc,none"],
                    "acc": out["results"][name]["acc,none"],
                    "abstained": out["results"][name]["abstained,none"],
                }
    print(
        f"KSD {args.ksd}: layers {method.config.layers}, window {method.config.window}, "
        f"alpha {method.config.alpha:.4f}; fit {fit_s:.0f} s; {args.n} documents per task\n"
    )
    print("| task [format] | base acc | unlearned acc | abstained |\n|---|---|---|---|")
    for key, r in rows.items():
        print(f"| {key} | {r['base_acc']:.3f} | {r['acc']:.3f} | {100 * r['abstained']:.0f}% |")
    if args.json:
        settings = {"n": args.n, "ksd": args.ksd, "batch_size": args.batch_size, "data": "../shared/data"}
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
