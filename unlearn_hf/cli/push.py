"""``unlearn-hf push``: upload a saved unlearned model folder to the Hub, as it was saved, with a model card that
names the skills (and the demo's evaluation) that ``fit`` and ``demo`` recorded beside the checkpoint."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from .common import UserError, _one_line, load_model, split_names

logger = logging.getLogger(__name__)

#: Written by ``fit`` and ``demo`` next to the checkpoint they save: what its model card says (the forgotten and kept
#: skills, the demo's evaluation rows), tied to that save by the SHA-256 of its ``unlearn_config.json``.
CARD_INFO_NAME = "unlearn_card.json"
_CARD_INFO_MAX_BYTES = 1 << 20


def add_push_arguments(push: argparse.ArgumentParser) -> None:
    push.add_argument("--model", required=True, help="folder saved by `unlearn-hf fit` / save_pretrained")
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None)
    push.add_argument("--commit-message", default=None)
    push.add_argument(
        "--save-base-model",
        action="store_true",
        help="also upload the base model's files (a light folder whose base model is a local folder needs it)",
    )
    push.add_argument(
        "--forget-skill", default=None, help=f"the model card's forgotten skill (default: {CARD_INFO_NAME})"
    )
    push.add_argument("--retain-skills", default=None, help="comma-separated skills the card says are kept")


def _config_digest(folder: Path) -> str:
    from ..persistence.format import CONFIG_NAME

    return hashlib.sha256((folder / CONFIG_NAME).read_bytes()).hexdigest()


def write_card_info(
    folder: Path, forget_skill: str, retain_skills: list[str], evaluation: list[dict[str, Any]] | None = None
) -> None:
    """Record beside the checkpoint just saved in ``folder`` what its model card says (read back by ``push``)."""
    info = {"forget_skill": forget_skill, "retain_skills": list(retain_skills), "evaluation": evaluation}
    info["unlearn_config_sha256"] = _config_digest(folder)
    (folder / CARD_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def read_card_info(folder: Path) -> dict[str, Any]:
    """The model card fields recorded for the checkpoint in ``folder`` (``{}`` when none, or when they were
    recorded for another save since replaced, e.g. by ``save_pretrained`` from Python: then a warning)."""
    path = folder / CARD_INFO_NAME
    if not path.is_file():
        return {}
    try:
        if path.stat().st_size > _CARD_INFO_MAX_BYTES:
            raise ValueError(f"larger than {_CARD_INFO_MAX_BYTES} bytes")
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise UserError(f"{path} cannot be read ({_one_line(err)}); fix or delete it.") from err
    if info.get("unlearn_config_sha256") != _config_digest(folder):
        logger.warning(
            "%s describes an earlier save in %s, not this one: not used for the model card.", path, folder
        )
        return {}
    skills = info.get("retain_skills")
    rows = info.get("evaluation")
    if not isinstance(info.get("forget_skill"), str) or not (
        isinstance(skills, list) and all(isinstance(s, str) for s in skills)
    ):
        raise UserError(f"{path}: 'forget_skill' must be a string and 'retain_skills' a list of strings.")
    if rows is not None and not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
        raise UserError(f"{path}: 'evaluation' must be a list of rows (objects).")
    return {"forget_skill": info["forget_skill"], "retain_skills": skills, "evaluation": rows}


def cmd_push(args: argparse.Namespace) -> int:
    """Upload the folder as it was saved: its layout (a full folder with the base model's files), its tokenizer and
    the base model and data it names, so that the repo loads anywhere."""
    from ..persistence.config_file import read_config
    from ..persistence.format import CONFIG_NAME, LAYOUT_FULL
    from ..persistence.hub import is_local_base

    if not (Path(args.model) / CONFIG_NAME).is_file():
        raise UserError(f"{args.model!r} is not a folder saved by unlearn_hf (no {CONFIG_NAME}).")
    saved = read_config(Path(args.model))  # validated; a broken config is one line (UnlearnFormatError)
    full = args.save_base_model or saved.layout == LAYOUT_FULL
    base = saved.base_model
    if not full and is_local_base(base.name_or_path):
        raise UserError(
            f"{args.model} is a light folder whose base model is the local folder {base.name_or_path!r}: a repo "
            "pushed from it loads nowhere else. Pass --save-base-model to upload the base model's files too."
        )
    card = read_card_info(Path(args.model))
    if args.forget_skill is not None:
        card["forget_skill"] = args.forget_skill
    if args.retain_skills is not None:
        card["retain_skills"] = split_names(args.retain_skills)
    model, tok = load_model(args.model, args.dtype)
    try:
        url = model.push_to_hub(
            args.repo_id,
            private=args.private,
            token=args.token,
            commit_message=args.commit_message,
            save_base_model=full,
            tokenizer=tok,
            base_model_name_or_path=None if full else base.name_or_path,
            base_model_revision=None if full else base.revision,
            forget_data=saved.forget_data,
            retain_data=saved.retain_data,
            **card,
        )
    except Exception as err:  # the Hub's answer (401, 404...) or no network: the user's to fix, one line
        # ValueError: push_unlearned's refusals (private=True on a public repo, a local base, card values)
        if isinstance(err, (OSError, ValueError)) or type(err).__module__.split(".")[0] in (
            "httpx",
            "httpx2",
            "requests",
        ):
            raise UserError(f"Cannot push to {args.repo_id!r}: {_one_line(err)}") from err
        raise
    print(f"pushed to {url}")
    return 0
