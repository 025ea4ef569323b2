"""Skill definitions: the static description of every skill (:class:`SkillSpec`) and where its data lives."""

from __future__ import annotations

from dataclasses import dataclass

MLQA_LANGUAGES = ("en", "de", "es", "ar", "zh", "vi", "hi")


@dataclass(frozen=True)
class SkillSpec:
    """Static description of a skill.

    Args:
        name: skill name used by :func:`get_skill`.
        category: what it measures (``"math"``, ``"python"``, ``"knowledge"``, ``"language"``).
        hub_path / hub_config: the Hugging Face Hub data set used when no ``data_dir`` is given.
        folder: name of the skill's folder inside a local data root.
        description: one line for reports.
        eval_part: where its evaluation items come from (for reports and model cards).
    """

    name: str
    category: str
    hub_path: str
    hub_config: str | None
    folder: str
    description: str = ""
    eval_part: str = ""


SPECS: dict[str, SkillSpec] = {
    "gsm8k": SkillSpec(
        "gsm8k", "math", "openai/gsm8k", "main", "gsm8k", "grade-school math word problems", "test split"
    ),
    "mbpp": SkillSpec(
        "mbpp", "python", "google-research-datasets/mbpp", "full", "mbpp", "basic Python tasks", "test split"
    ),
    "humaneval": SkillSpec(
        "humaneval",
        "python",
        "openai/openai_humaneval",
        None,
        "humaneval",
        "Python function completion",
        "even positions",
    ),
    "mmlu": SkillSpec(
        "mmlu", "knowledge", "cais/mmlu", "all", "mmlu", "57-subject multiple choice", "test split, even rows"
    ),
    **{
        f"mlqa-{lang}": SkillSpec(
            f"mlqa-{lang}",
            "language",
            "facebook/mlqa",
            f"mlqa.{lang}.{lang}",
            "mlqa",
            f"MLQA reading ({lang})",
            "dev split, even contexts",
        )
        for lang in MLQA_LANGUAGES
    },
}
"""The skills :func:`~unlearn_hf.evaluation.skills.get_skill` knows, by name."""
