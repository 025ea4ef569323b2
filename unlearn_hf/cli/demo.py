"""The main job: unlearn one skill from SmolLM2-135M-Instruct with each method, on real data, measured."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..evaluation import build_report, markdown_table, save_report
from ..evaluation.runner import abstention_rates, evaluate_skills
from ..tokenizing import prompt_tensors
from ..wrapper import UnlearnedModelForCausalLM
from .arguments import ratio_settings
from .common import UserError, forget_and_retain, load_model, split_names
from .push import write_card_info
from .recipes import data_descriptions, fit_methods, method_names

logger = logging.getLogger(__name__)


def _card_skill(skill, n: int) -> str:
    """A model card's skill cell: the skill, where its evaluation items come from and how many were scored."""
    return f"{skill.name} ({skill.spec.eval_part}, {n} held-out items)"


def _card_metric(skill: str) -> str:
    """A model card's metric cell: what the demo scored on ``skill`` (an abstained item scores 0)."""
    if skill == "mmlu":
        return "5-shot multiple-choice accuracy (abstention decided on the QA prompt; abstained = 0)"
    return "teacher-forced answer-token accuracy, QA template (abstained = 0)"


def _say(quiet: bool, text: str) -> None:
    print(text, flush=True) if not quiet else None


def _sample_answer(model: Any, tok: Any, prompt: str, max_new_tokens: int = 40) -> str:
    enc = prompt_tensors(tok, prompt)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return (
        tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip().replace("\n", " ")
    )


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Fit NA, SP and KSD forgetting ``args.forget`` while retaining ``args.retain``; evaluate the base model and
    each unlearned model on held-out items; write results.json/.md/.png and the KSD model folder with its card."""
    start = time.perf_counter()
    quiet = args.quiet
    methods = split_names(args.methods)
    labels = method_names()
    bad = [m for m in methods if m not in labels]
    if bad or not methods:
        raise UserError(f"Unknown methods {bad}; choose from {sorted(labels)}.")
    if not Path(args.data_dir).is_dir():
        raise UserError(
            f"Data folder {args.data_dir!r} not found (expected the skill data sets, e.g. ../shared/data)."
        )
    forget, retain = forget_and_retain(args.forget, args.retain, args.data_dir)
    skills = [forget, *retain]
    n_eval = {s.name: (args.n_eval_mmlu if s.name == "mmlu" else args.n_eval) for s in skills}
    out_dir = Path(args.output)

    _say(quiet, f"== unlearn-hf demo: forget {forget.name}, retain {', '.join(s.name for s in retain)} ==")
    model, tok = load_model(args.model, args.dtype)
    out_dir.mkdir(parents=True, exist_ok=True)  # after the model loads: a wrong --model leaves no folder
    torch.manual_seed(0)
    eval_kw = dict(batch_size=args.batch_size, show_progress=not quiet)
    _say(quiet, "evaluating the base model ...")
    scores = {"base": evaluate_skills(model, tok, skills, n_eval, **eval_kw)}
    formats = ("qa", "chat")  # abstention is measured as the QA template and as the chat template send it
    abstention = {"base": {fmt: {s.name: 0.0 for s in skills} for fmt in formats}}
    timings, fitted, chosen = {}, {}, {}
    for m in methods:
        label = labels[m]
        _say(quiet, f"fitting {label} ...")
        unlearned = UnlearnedModelForCausalLM.from_base(model)
        t0 = time.perf_counter()
        try:
            fitted[m] = fit_methods(
                unlearned,
                tok,
                [m],
                forget,
                retain,
                n_probe=args.n_probe,
                **ratio_settings(args),
                alpha=args.alpha,
                max_batch_tokens=args.max_batch_tokens,
                show_progress=not quiet,
            )[m]
        except ValueError as err:  # the fit's refusal of this data or model, as `fit` says it
            raise UserError(str(err)) from err
        timings[f"fit_{m}_s"] = round(time.perf_counter() - t0, 1)
        curve = getattr(fitted[m], "ratio_curve", None)
        if curve is not None:
            chosen[label] = {
                "ratio": curve.ratio,
                "ratios": curve.ratios,
                "held_out_forget_drop": round(curve.forget_drop[curve.chosen], 4),
                "held_out_retain_drop": round(curve.retain_drop[curve.chosen], 4),
                "max_retain_drop": fitted[m].config.max_retain_drop,
            }
            _say(quiet, f"{label}: ratio 'auto' chose {curve.ratio:g}\n{curve.table()}")
        _say(quiet, f"evaluating {label} ...")
        scores[label] = evaluate_skills(unlearned, tok, skills, n_eval, **eval_kw)
        abstention[label] = {
            fmt: abstention_rates(
                unlearned, tok, skills, n_eval, batch_size=args.batch_size, prompt_format=fmt
            )
            for fmt in formats
        }
        unlearned.remove_all_methods()

    settings = {
        "model": args.model,
        "forget": forget.name,
        "retain": [s.name for s in retain],
        "n_probe": args.n_probe,
        "n_eval": n_eval,
        "ratio": args.ratio,
        "ratio_chosen": chosen,
        "alpha": args.alpha,
        "methods": methods,
        "metric": "teacher-forced answer-token accuracy (MMLU: 5-shot multiple-choice accuracy); abstained = 0",
    }
    report = build_report(scores, baseline="base", metadata={**settings, "abstention_rate": abstention})
    table = markdown_table(report)
    paths = save_report(report, out_dir, stem="results", plot=None)  # the chart when matplotlib is there
    print("\n" + table, flush=True)  # the results: printed even with --quiet
    print("\nabstention (held-out questions; QA template | chat template):")
    for k, by_format in abstention.items():
        print(
            f"  {k}: "
            + ", ".join(f"{s} {by_format['qa'][s]:.0%} | {by_format['chat'][s]:.0%}" for s in by_format["qa"])
        )

    # one answer per skill from the base model and from each unlearned model (for the reader: not with --quiet)
    _say(quiet, "\nsample answers (greedy, 40 tokens):")
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    for skill in [] if quiet else skills:
        prompt = skill.eval_items(1)[0].prompt
        _say(quiet, f"[{skill.name}] {prompt.splitlines()[0][:100]}")
        _say(quiet, f"    base: {_sample_answer(model, tok, prompt)[:160]}")
        for m, method in fitted.items():
            unlearned.add_method(method.method_type, method)
            _say(quiet, f"    {m:>4}: {_sample_answer(unlearned, tok, prompt)[:160]}")
            unlearned.remove_all_methods()

    # save the headline model (the first abstaining method if one was fitted, e.g. KSD) with its model card
    keep = next((m for m in methods if fitted[m].abstains), methods[-1])
    saved = UnlearnedModelForCausalLM.from_base(model)
    saved.add_method(fitted[keep].method_type, fitted[keep])
    model_dir = out_dir / f"smollm2-no-{forget.name}-{keep}"
    by_name = {skill.name: skill for skill in skills}
    evaluation_rows = [
        {
            "method": label,
            "skill": _card_skill(by_name[s], n_eval[s]),
            "metric": _card_metric(s),
            "before": report["scores"]["base"][s],
            "after": report["scores"][label][s],
            "relative_drop": report["relative_drop"][label][s],
        }
        for label in report["relative_drop"]
        for s in report["skills"]
        if report["scores"]["base"][s] is not None and report["scores"][label][s] is not None
    ]
    # one atomic save, the tokenizer and what the fit read included
    saved.save_pretrained(
        model_dir, tokenizer=tok, **data_descriptions(forget, retain, args.n_probe, args.data_dir)
    )
    _write_card(saved, model_dir, forget, retain, args, evaluation_rows)
    elapsed = time.perf_counter() - start
    report["metadata"]["timings"] = {**timings, "total_s": round(elapsed, 1)}
    save_report(report, out_dir, stem="results", plot="png" in paths)
    print(f"\nresults: {', '.join(str(p) for p in paths.values())}", flush=True)
    print(
        f"unlearned model ({labels[keep]}): {model_dir}  (load with UnlearnedModelForCausalLM.from_pretrained)",
    )
    _say(quiet, f"total time {elapsed:.0f} s")
    return report


def _write_card(unlearned, model_dir: Path, forget, retain, args, rows) -> None:
    from ..model_card import ModelCardInfo, render_model_card

    info = ModelCardInfo(
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct" if args.model == "smollm2" else args.model,
        forget_skill=forget.name,
        retain_skills=[s.name for s in retain],
        **data_descriptions(forget, retain, args.n_probe, args.data_dir),
        methods=[{"name": n, "config": m.config.to_dict()} for n, m in unlearned.methods.items()],
        evaluation=rows,
        repo_id=f"your-name/{model_dir.name}",
    )
    render_model_card(info).save(str(model_dir / "README.md"))
    # what `unlearn-hf push` puts on the card of this folder
    write_card_info(model_dir, info.forget_skill, info.retain_skills, rows)
