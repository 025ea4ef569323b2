"""``unlearn-hf evaluate --harness lm-eval``: lm-evaluation-harness tasks, in every prompt format asked for."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import UserError, formats_for, load_model, split_names


def check_harness_options(args: argparse.Namespace, lm_eval: bool) -> None:
    """Refuse the options of the other harness (``evaluate`` would ignore them)."""
    other = (
        {"--skills": args.skills, "--n-eval": args.n_eval, "--data-dir": args.data_dir}
        if lm_eval
        else {"--tasks": args.tasks, "--limit": args.limit, "--num-fewshot": args.num_fewshot}
    )
    given = [flag for flag, value in other.items() if value is not None]
    if given:
        what = (
            "options of the native harness; lm-eval reads --tasks"
            if lm_eval
            else "lm-eval options; add --harness lm-eval."
        )
        raise UserError(f"{', '.join(given)}: {what}")


def evaluate_lm_eval(args: argparse.Namespace, output: Path | None) -> int:
    """Run lm-eval's tasks on ``args.model`` once per format; print our table, write our report to ``output`` and
    lm-eval's own results beside it (``<output>.lm_eval.json``)."""
    from ..evaluation import build_report, markdown_table, write_json

    try:
        from lm_eval.utils import handle_non_serializable

        from ..integrations.lm_eval.run import (
            YAML_SUFFIXES,
            TaskLoadError,
            evaluate_with_lm_eval,
            summary,
            task_manager_for,
        )
    except ImportError as err:
        raise UserError(
            f"--harness lm-eval needs lm-eval ({err}): pip install 'unlearn_hf[lm-eval]'."
        ) from err
    tasks = split_names(args.tasks or "")
    if not tasks:
        raise UserError("--harness lm-eval needs --tasks: lm-eval task names or YAML paths, comma-separated.")
    missing = [t for t in tasks if t.endswith(YAML_SUFFIXES) and not Path(t).expanduser().is_file()]
    if missing:
        raise UserError(f"--tasks: no such YAML file {missing}.")
    tasks = [str(Path(t).expanduser()) if Path(t).expanduser().is_file() else t for t in tasks]
    try:
        manager = task_manager_for(tasks)  # before the model load: a misspelt name fails at once
    except TaskLoadError as err:
        raise UserError(f"lm-eval cannot load the tasks {tasks}: {err}") from err
    model, tok = load_model(args.model, args.dtype)
    formats = formats_for(args.formats, tok, args.model)
    results, scores = {}, {}
    for fmt in formats:
        try:
            results[fmt] = evaluate_with_lm_eval(
                model,
                tok,
                tasks,
                prompt_format=fmt,
                batch_size=args.batch_size,
                limit=args.limit,
                num_fewshot=args.num_fewshot,
                task_manager=manager,
            )
        except TaskLoadError as err:
            raise UserError(f"lm-eval cannot load the tasks {tasks}: {err}") from err
        scores[f"{args.model} [{fmt}]"] = summary(results[fmt])
    meta = {
        "model": args.model,
        "harness": "lm-eval",
        "tasks": tasks,
        "formats": formats,
        "limit": args.limit,
    }
    report = build_report(scores, metadata=meta, relative=False)  # formats of one model: no drop between them
    print(markdown_table(report))
    if output is not None:
        write_json(report, output)
        lm_path = output.with_name(output.stem + ".lm_eval.json")
        text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
        lm_path.write_text(text + "\n", encoding="utf-8")
        print(f"results written to {output} (lm-eval's own: {lm_path})")
    return 0
