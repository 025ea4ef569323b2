"""Skill data sets and metrics for measuring what an unlearned model still knows.

Skills: ``skill_specs`` (what each skill is), ``skills`` (the registry, :func:`get_skill`), ``items``
(:class:`EvalItem`), ``prompts`` (templates), ``data_files`` (local folder / Hub reading), ``skill_loaders``
(per-skill probe/eval splits).
Metrics: ``token_accuracy`` (teacher-forced answer tokens), ``multiple_choice`` (MMLU), ``generation`` and
``exact_match`` (GSM8K), ``execution`` (pass@1 of code), ``abstention``, ``results`` (:class:`MetricResult`,
:func:`relative_drop`); ``batching`` holds their padding-aware forwards. ``runner`` scores several skills,
``report`` writes reports.
"""

from .abstention import abstention_rate, detect_abstention
from .exact_match import extract_gsm8k_reference, extract_last_number, gsm8k_exact_match, normalize_number
from .execution import (
    CodeExecutionNotAllowedError,
    ExecutionResult,
    build_program,
    check_completion,
    extract_code,
    pass_at_1,
    run_program,
)
from .generation import generate_completions
from .items import EvalItem
from .multiple_choice import mmlu_accuracy, mmlu_prompt
from .prompts import PROMPT_TEMPLATE
from .report import build_report, load_json, markdown_table, plot_report, save_report, write_json
from .results import MetricResult, relative_drop
from .skill_specs import MLQA_LANGUAGES, SkillSpec
from .skills import Skill, available_skills, get_skill
from .token_accuracy import answer_token_accuracy

__all__ = [
    "MLQA_LANGUAGES",
    "PROMPT_TEMPLATE",
    "CodeExecutionNotAllowedError",
    "EvalItem",
    "ExecutionResult",
    "MetricResult",
    "Skill",
    "SkillSpec",
    "abstention_rate",
    "answer_token_accuracy",
    "available_skills",
    "build_program",
    "build_report",
    "check_completion",
    "detect_abstention",
    "extract_code",
    "extract_gsm8k_reference",
    "extract_last_number",
    "generate_completions",
    "get_skill",
    "gsm8k_exact_match",
    "load_json",
    "markdown_table",
    "mmlu_accuracy",
    "mmlu_prompt",
    "normalize_number",
    "pass_at_1",
    "plot_report",
    "relative_drop",
    "run_program",
    "save_report",
    "write_json",
]
