"""Model cards for unlearned models pushed to the Hugging Face Hub."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .persistence.format import looks_like_local_path

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "unlearned_model.md"
BASE_TAGS = ("unlearn_hf", "machine-unlearning", "skill-unlearning")
_EVAL_KEYS = ("skill", "metric", "before", "after")


@dataclass
class ModelCardInfo:
    """What the model card says about an unlearned model.

    ``forget_skill``: the unlearned skill, or a list of them (several Key Space Detection skills on one model).
    ``methods`` holds one dict per method: ``{"name": "neuron_adjust", "config": {...}}``. ``evaluation`` rows are
    ``{"method"?, "skill", "metric", "before", "after", "relative_drop"?}`` with ``relative_drop`` a fraction
    (``(before - after) / before``, computed when missing).
    """

    base_model: str
    forget_skill: str | list[str]
    methods: list[dict[str, Any]]
    repo_id: str
    base_model_revision: str | None = None
    retain_skills: list[str] = field(default_factory=list)
    forget_data: str | None = None
    retain_data: str | None = None
    evaluation: list[dict[str, Any]] | None = None
    library_version: str | None = None
    license: str | None = None
    tags: list[str] = field(default_factory=list)


def _template_text() -> str:
    """The Jinja template, from the installed package or, in a dev checkout, the top-level folder."""
    try:
        resource = resources.files("unlearn_hf.model_cards") / TEMPLATE_NAME
        if resource.is_file():
            return resource.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        pass
    path = Path(__file__).resolve().parents[1] / "model_cards" / TEMPLATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"Model card template {TEMPLATE_NAME!r} not found (looked in the package and {path})."
        )
    logger.debug("Using the model card template from %s", path)
    return path.read_text(encoding="utf-8")


def method_tag(name: str) -> str:
    """Hub tag of a method name: ``neuron_adjust`` / ``Neuron Adjust`` -> ``neuron-adjust``."""
    return "-".join(name.replace("_", " ").replace("-", " ").lower().split())


def _method_section(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The template's fields of one method: its title (the registered class's label for a config with a known
    ``method_type``, else for a method registered under ``name``, else the name in title case), the class's
    summary, the name it was attached under and its settings."""
    from .methods.registry import METHOD_CLASSES, discover

    discover()
    cls = METHOD_CLASSES.get(config.get("method_type")) or METHOD_CLASSES.get(name)
    return {
        "name": name,
        "title": cls.label if cls is not None else name.replace("_", " ").replace("-", " ").title(),
        "summary": cls.summary if cls is not None else "",
        "attached": config.get("attached_as"),
        "config": [(_cell(k), _cell(v)) for k, v in config.items()],
    }


def _cell(value: Any) -> str:
    """A value as markdown table cell text."""
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _percent(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, float)):
        return f"{value:.1%}"
    return _cell(value)


def _validate(info: ModelCardInfo) -> None:
    for name in ("base_model", "forget_skill", "repo_id"):
        value = getattr(info, name)
        several = name == "forget_skill" and isinstance(value, (list, tuple))
        if not all(isinstance(v, str) and v.strip() for v in (value if several else [value])) or not value:
            kind = "a non-empty string or a list of them" if name == "forget_skill" else "a non-empty string"
            raise ValueError(f"ModelCardInfo.{name} must be {kind}, got {value!r}.")
    if not info.methods:
        raise ValueError("ModelCardInfo.methods is empty: list at least one unlearning method.")
    for i, method in enumerate(info.methods):
        if (
            not isinstance(method, dict)
            or not isinstance(method.get("name"), str)
            or not method["name"].strip()
        ):
            raise ValueError(
                f"ModelCardInfo.methods[{i}] must be a dict with a non-empty 'name', got {method!r}."
            )
        config = method.get("config", {})
        if config is not None and not isinstance(config, dict):
            raise ValueError(
                f"ModelCardInfo.methods[{i}]['config'] must be a dict, got {type(config).__name__}."
            )
    for i, row in enumerate(info.evaluation or []):
        missing = [key for key in _EVAL_KEYS if not isinstance(row, dict) or key not in row]
        if missing:
            raise ValueError(
                f"ModelCardInfo.evaluation[{i}] lacks {missing}; each row needs {list(_EVAL_KEYS)}."
            )


def _relative_drop(row: dict[str, Any]) -> Any:
    if row.get("relative_drop") is not None:
        return row["relative_drop"]
    before, after = row["before"], row["after"]
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and before:
        return (before - after) / before
    return None


def render_model_card(info: ModelCardInfo) -> ModelCard:
    """Render the model card of an unlearned model (metadata + markdown body)."""
    _validate(info)
    if info.library_version is None:
        from .version import __version__ as library_version
    else:
        library_version = info.library_version

    skills = [info.forget_skill] if isinstance(info.forget_skill, str) else list(info.forget_skill)
    forget_skill = _cell(skills[0] if len(skills) == 1 else ", ".join(skills[:-1]) + " and " + skills[-1])
    method_names = [m["name"].strip() for m in info.methods]
    tags = list(dict.fromkeys([*BASE_TAGS, *(method_tag(n) for n in method_names), *info.tags]))
    # a local folder is no Hub id: the Hub refuses such a `base_model` in the metadata, and its path is private
    local_base = looks_like_local_path(info.base_model) or Path(info.base_model).exists()
    shown_base = Path(info.base_model).name if local_base else info.base_model
    card_data = ModelCardData(
        base_model=None if local_base else info.base_model,
        library_name="unlearn_hf",
        pipeline_tag="text-generation",
        license=info.license,
        tags=tags,
    )
    methods = [_method_section(name, m.get("config") or {}) for name, m in zip(method_names, info.methods)]
    evaluation = [
        {
            "method": _cell(row.get("method", "")),
            "skill": _cell(row["skill"]),
            "metric": _cell(row["metric"]),
            "before": _cell(row["before"]),
            "after": _cell(row["after"]),
            "relative_drop": _percent(_relative_drop(row)),
        }
        for row in info.evaluation or []
    ]
    card = ModelCard.from_template(
        card_data,
        template_str=_template_text(),
        title=f"{info.repo_id.split('/')[-1]}: {forget_skill} unlearned from {shown_base}",
        base_model=shown_base,
        base_model_url=None if local_base else f"https://huggingface.co/{info.base_model}",
        base_model_revision=info.base_model_revision,
        forget_skill=forget_skill,
        skill_word="skills" if len(skills) > 1 else "skill",
        several_skills=len(skills) > 1,
        retain_skills=[_cell(skill) for skill in info.retain_skills],
        forget_data=_cell(info.forget_data) if info.forget_data else None,
        retain_data=_cell(info.retain_data) if info.retain_data else None,
        methods=methods,
        evaluation=evaluation,
        evaluation_has_method=any("method" in row for row in info.evaluation or []),
        library_version=library_version,
        repo_id=info.repo_id,
        tokenizer_id=info.repo_id if local_base else info.base_model,
    )
    logger.debug("Rendered model card for %s (%d methods)", info.repo_id, len(methods))
    return card
