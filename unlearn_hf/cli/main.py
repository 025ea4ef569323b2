"""``unlearn-hf``: fit, evaluate, generate, push, and the end-to-end demo.

Exit codes: 0 success, 1 unexpected failure (with traceback), 2 user error (one line, no traceback),
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..evaluation.data_files import DataFileError
from ..persistence.atomic import AtomicSaveError
from ..persistence.format import UnlearnFormatError
from ..tokenizing import prompt_tensors
from ..version import __version__
from .arguments import (
    DEFAULT_DATA,
    N_PROBE_HELP,
    POSITIVE_INT,
    Parser,
    add_common,
    add_data,
    add_ratio_options,
    check_retain_budget,
    number,
    output_file,
    output_folder,
    ratio_settings,
)
from .common import (
    UserError,
    check_format_names,
    fitted_summary,
    forget_and_retain,
    formats_for,
    load_model,
    load_skills,
    setup_logging,
    split_names,
)
from .push import add_push_arguments, cmd_push, write_card_info
from .recipes import method_names

logger = logging.getLogger("unlearn_hf.cli")


#: Failures caused by the command line or its inputs: one line on stderr, exit code 2. Anything else is a bug or
#: an environment failure: traceback, exit code 1.
USER_ERRORS = (
    UserError,
    UnlearnFormatError,
    AtomicSaveError,
    DataFileError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="unlearn-hf",
        description="Training-free skill unlearning for Hugging Face causal LMs "
        "(Neuron Adjust, Key Space Detection, Selective Pruning).",
    )
    parser.add_argument("--version", action="version", version=f"unlearn-hf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    fit = sub.add_parser("fit", help="fit unlearning methods and save the unlearned model folder")
    fit.add_argument("--model", default="smollm2", help="'smollm2', a model folder or a Hub id")
    names = method_names()
    fit.add_argument(
        "--method",
        action="append",
        choices=list(names),
        required=True,
        help="method to fit (repeat for several; fitted in this order, each on the model with the earlier ones "
        "attached, as the Python API does: put ksd last): " + ", ".join(f"{k}={v}" for k, v in names.items()),
    )
    fit.add_argument("--forget", required=True, help="skill to forget, e.g. gsm8k")
    fit.add_argument(
        "--retain", default="mbpp", help="comma-separated skills to keep ('' with ksd alone: no calibration)"
    )
    fit.add_argument("--n-probe", type=POSITIVE_INT, default=200, help=N_PROBE_HELP)
    add_ratio_options(fit)
    fit.add_argument(
        "--layers",
        default=None,
        help="comma-separated layers for ksd (default: calibrated on the retain skills)",
    )
    fit.add_argument(
        "--alpha",
        type=number(float, 0, open_low=True),
        default=None,
        help="ksd hypercube multiplier (default: calibrated on the retain skills)",
    )
    fit.add_argument(
        "--template",
        dest="templates",
        action="append",
        default=None,
        help="ksd: also fit on questions in this template, holding {question} (repeatable)",
    )
    fit.add_argument(
        "--max-false-rate",
        type=number(float, 0, 1),
        default=None,
        help="ksd: false-abstention budget of calibration (0.02)",
    )
    fit.add_argument("--refusal", default="I can't help with that.", help="ksd refusal text")
    fit.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=0)
    fit.add_argument(
        "--deterministic",
        action="store_true",
        help="na: deterministic replacement, so that a ksd fitted after it decides alike alone and in a batch",
    )
    fit.add_argument(
        "--batch-size",
        type=POSITIVE_INT,
        default=None,
        help="at most this many examples per forward (default: as many as --max-batch-tokens allows)",
    )
    fit.add_argument(
        "--max-batch-tokens",
        type=POSITIVE_INT,
        default=None,
        help="padded tokens per forward of a fit (default: the device's, 1024 on a CPU)",
    )
    fit.add_argument("--output", required=True, help="folder to save the unlearned model to")
    fit.add_argument("--save-base-model", action="store_true", help="also copy the base model's weights")
    add_data(fit)
    add_common(fit)

    ev = sub.add_parser("evaluate", help="score a (possibly unlearned) model on skills")
    ev.add_argument(
        "--model", default="smollm2", help="'smollm2', a saved unlearned folder, a model folder or Hub id"
    )
    ev.add_argument("--skills", default=None, help="comma-separated skill names (default: gsm8k,mbpp,mmlu)")
    ev.add_argument(
        "--formats",
        default=None,
        help="prompt formats to score in: qa (Question/Answer template), chat "
        "(the tokenizer's chat template; MMLU stays 5-shot QA); default: qa, and chat when the tokenizer has one",
    )
    ev.add_argument(
        "--harness",
        choices=("native", "lm-eval"),
        default="native",
        help="native: this library's skill scores; lm-eval: lm-evaluation-harness tasks (--tasks)",
    )
    ev.add_argument("--tasks", default=None, help="lm-eval: comma-separated task names or YAML paths")
    ev.add_argument("--limit", type=POSITIVE_INT, default=None, help="lm-eval: documents per task")
    ev.add_argument("--num-fewshot", type=number(int, 0), default=None, help="lm-eval: few-shot examples")
    ev.add_argument(
        "--n-eval", type=POSITIVE_INT, default=None, help="held-out items per skill (default: 50)"
    )
    ev.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    ev.add_argument("--output", default=None, help="write the results JSON here")
    add_data(ev)
    add_common(ev)

    gen = sub.add_parser("generate", help="generate from a prompt, or chat interactively")
    gen.add_argument("--model", default="smollm2")
    gen.add_argument("--prompt", default=None, help="the prompt; without it, an interactive chat on stdin")
    gen.add_argument("--template", default="Question: {prompt}\nAnswer:", help="prompt template ('{prompt}')")
    gen.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    add_common(gen)

    push = sub.add_parser("push", help="upload a saved unlearned model folder to the Hugging Face Hub")
    add_push_arguments(push)
    add_common(push)

    demo = sub.add_parser("demo", help="the end-to-end run: unlearn GSM8K math from SmolLM2, measured")
    demo.add_argument("--forget", default="gsm8k")
    demo.add_argument("--retain", default="mbpp,mmlu")
    demo.add_argument("--data-dir", default=DEFAULT_DATA, help=f"skill data sets (default {DEFAULT_DATA})")
    demo.add_argument("--n-probe", type=POSITIVE_INT, default=200, help=N_PROBE_HELP)
    demo.add_argument(
        "--n-eval", type=POSITIVE_INT, default=50, help="held-out items per skill (MMLU: --n-eval-mmlu)"
    )
    demo.add_argument(
        "--n-eval-mmlu", type=POSITIVE_INT, default=40, help="MMLU items (5-shot prompts are long)"
    )
    add_ratio_options(demo)
    demo.add_argument(
        "--alpha", type=number(float, 0, open_low=True), default=None, help="KSD alpha (default: calibrated)"
    )
    demo.add_argument(
        "--methods", default=",".join(names), help=f"comma-separated subset of {','.join(names)}"
    )
    demo.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="examples per evaluation forward")
    demo.add_argument(
        "--max-batch-tokens",
        type=POSITIVE_INT,
        default=None,
        help="padded tokens per forward of a fit (default: the device's, 1024 on a CPU)",
    )
    demo.add_argument("--output", default="outputs/demo", help="results, chart and model folder")
    demo.add_argument("--model", default="smollm2", help="base model ('smollm2', a folder or a Hub id)")
    add_common(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(args.quiet)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as err:
        text = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
        print(f"unlearn-hf {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_fit(args: argparse.Namespace) -> int:
    from ..wrapper import UnlearnedModelForCausalLM
    from .recipes import check_options, data_descriptions, fit_methods

    check_retain_budget(args)
    out = output_folder(args.output)
    if Path(args.model).expanduser().is_dir() and Path(args.model).expanduser().resolve() == out.resolve():
        raise UserError(f"--output {args.output!r} is the base model's own folder; give another folder.")
    defaults = vars(build_parser().parse_args(["fit", "--method", "na", "--forget", "-", "--output", "-"]))
    try:
        check_options(args.method, {k for k, v in vars(args).items() if k in defaults and v != defaults[k]})
    except ValueError as err:
        raise UserError(str(err)) from err
    try:
        layers = [int(x) for x in split_names(args.layers)] if args.layers not in (None, "auto") else None
    except ValueError:
        raise UserError(
            f"--layers must be 'auto' or comma-separated integers, got {args.layers!r}."
        ) from None
    if layers is not None and not layers:
        raise UserError("--layers is empty; give layer numbers or 'auto'.")
    # no retain skill: Key Space Detection uncalibrated (the others refuse)
    forget, retain = forget_and_retain(args.forget, args.retain, args.data_dir)
    model, tok = load_model(args.model, args.dtype)
    if isinstance(model, UnlearnedModelForCausalLM):
        raise UserError(f"{args.model!r} is already an unlearned model; fit on its base model.")
    n_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    bad = [i for i in layers or [] if not 0 <= i < n_layers]
    if bad:
        raise UserError(f"--layers {bad} out of range: the model has layers 0..{n_layers - 1}.")
    unlearned = UnlearnedModelForCausalLM.from_base(model)
    try:
        fit_methods(
            unlearned,
            tok,
            args.method,
            forget,
            retain,
            n_probe=args.n_probe,
            **ratio_settings(args),
            alpha=args.alpha,
            layers=layers,
            refusal=args.refusal,
            templates=args.templates,
            max_false_rate=args.max_false_rate,
            seed=args.seed,
            deterministic=args.deterministic,
            batch_size=args.batch_size,
            max_batch_tokens=args.max_batch_tokens,
            show_progress=not args.quiet,
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    data = data_descriptions(forget, retain, args.n_probe, args.data_dir)
    unlearned.save_pretrained(out, save_base_model=args.save_base_model, tokenizer=tok, **data)
    write_card_info(out, forget.name, [s.name for s in retain])
    print(f"saved {fitted_summary(unlearned.methods)} to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation import build_report, markdown_table, write_json
    from ..evaluation.runner import evaluate_skills
    from .harness import check_harness_options, evaluate_lm_eval

    output = output_file(args.output)
    check_format_names(args.formats)
    lm_eval = args.harness == "lm-eval"
    check_harness_options(args, lm_eval)
    if lm_eval:
        return evaluate_lm_eval(args, output)
    args.skills = "gsm8k,mbpp,mmlu" if args.skills is None else args.skills
    args.n_eval = 50 if args.n_eval is None else args.n_eval
    skills = load_skills(split_names(args.skills), args.data_dir)
    model, tok = load_model(args.model, args.dtype)
    formats = formats_for(args.formats, tok, args.model)
    scores = {
        f"{args.model} [{fmt}]": evaluate_skills(
            model,
            tok,
            skills,
            args.n_eval,
            batch_size=args.batch_size,
            show_progress=not args.quiet,
            prompt_format=fmt,
        )
        for fmt in formats
    }
    meta = {"model": args.model, "n_eval": args.n_eval, "formats": formats}
    report = build_report(scores, metadata=meta, relative=False)  # formats of one model: no drop between them
    print(markdown_table(report))
    if output is not None:
        write_json(report, output)
        print(f"results written to {output}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:

    if "{prompt}" not in args.template:
        raise UserError(f"--template must hold '{{prompt}}', got {args.template!r}.")
    model, tok = load_model(args.model, args.dtype)

    def answer(prompt: str) -> str:
        text = args.template.replace("{prompt}", prompt)
        enc = prompt_tensors(tok, text)  # a template that starts with BOS gets it once
        if enc["input_ids"].shape[1] == 0:
            raise UserError("The prompt is empty (after --template): nothing to generate from.")
        out = model.generate(
            **enc, max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=tok.pad_token_id
        )
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    if args.prompt is not None:
        print(answer(args.prompt))
        return 0
    print("Interactive chat: one question per line; an empty line or Ctrl-D ends it.", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        print(answer(line.strip()), flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    check_retain_budget(args)
    output_folder(args.output)
    report = run_demo(args)
    print(json.dumps({"results": str(Path(args.output) / "results.json")}))
    return 0 if report else 1


COMMANDS = {
    "fit": cmd_fit,
    "evaluate": cmd_evaluate,
    "generate": cmd_generate,
    "push": cmd_push,
    "demo": cmd_demo,
}


if __name__ == "__main__":
    sys.exit(main())
