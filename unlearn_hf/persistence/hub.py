"""Uploading an unlearned model to the Hugging Face Hub, with a model card."""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config_file import read_config
from .format import looks_like_local_path
from .save import base_name, resolve_layout, save_unlearned

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload unlearned model (unlearn_hf)"
_CARD_FIELDS = (
    "forget_skill",
    "retain_skills",
    "forget_data",
    "retain_data",
    "evaluation",
    "license",
    "tags",
    "base_model",
    "base_model_revision",
)


def evaluation_rows(evaluation: Any) -> list[dict[str, Any]] | None:
    """Model-card evaluation rows from a list of rows, or from ``{skill: {"metric", "before", "after", ...}}``."""
    if evaluation is None:
        return None
    if isinstance(evaluation, Mapping):
        rows = []
        for skill, values in evaluation.items():
            if not isinstance(values, Mapping):
                raise TypeError(
                    f"evaluation[{skill!r}] must be a dict with 'metric', 'before' and 'after', got "
                    f"{type(values).__name__}."
                )
            rows.append({"skill": skill, **values})
        return rows
    if isinstance(evaluation, Sequence) and not isinstance(evaluation, str):
        rows = []
        for row in evaluation:
            if dataclasses.is_dataclass(row) and not isinstance(row, type):
                row = dataclasses.asdict(row)
            if not isinstance(row, Mapping):
                raise TypeError(f"Each evaluation row must be a dict, got {type(row).__name__}.")
            rows.append(dict(row))
        return rows
    raise TypeError(f"evaluation must be a list of rows or a dict by skill, got {type(evaluation).__name__}.")


def _card_values(card_info: Any, explicit: dict[str, Any]) -> dict[str, Any]:
    """Merge ``card_info`` (a dict or a ``ModelCardInfo``) with the explicit arguments (which win)."""
    values: dict[str, Any] = {}
    if card_info is not None:
        if dataclasses.is_dataclass(card_info) and not isinstance(card_info, type):
            card_info = {f.name: getattr(card_info, f.name) for f in dataclasses.fields(card_info)}
        if not isinstance(card_info, Mapping):
            raise TypeError(f"card_info must be a dict or a ModelCardInfo, got {type(card_info).__name__}.")
        unknown = sorted(set(card_info) - set(_CARD_FIELDS) - {"methods", "repo_id", "library_version"})
        if unknown:
            raise ValueError(f"Unknown card_info keys {unknown}; known: {sorted(_CARD_FIELDS)}.")
        values.update({k: v for k, v in card_info.items() if k in _CARD_FIELDS and v is not None})
    values.update({k: v for k, v in explicit.items() if v is not None})
    return values


def build_model_card(folder: Path, repo_id: str, values: dict[str, Any]):
    """Render the model card of the checkpoint saved in ``folder`` (see :mod:`unlearn_hf.model_card`)."""
    from ..model_card import ModelCardInfo, render_model_card

    saved = read_config(folder)
    forget_skill = values.get("forget_skill")
    if not forget_skill:
        logger.warning("No forget_skill given: the model card will call the unlearned skill 'unspecified'.")
        forget_skill = "unspecified"
    retain = values.get("retain_skills") or []
    if isinstance(retain, str):
        retain = [retain]
    base_model = values.get("base_model") or saved.base_model.name_or_path
    if not base_model:
        raise ValueError(
            "The model card needs the base model's name: pass base_model_name_or_path=... (or card_info="
            "{'base_model': ...}); this base model was built without one."
        )
    info = ModelCardInfo(
        base_model=base_model,
        base_model_revision=values.get("base_model_revision") or saved.base_model.revision,
        forget_skill=forget_skill,
        retain_skills=list(retain),
        methods=[
            {
                "name": m.method_type,
                "config": {**({"attached_as": m.name} if m.name != m.method_type else {}), **m.config},
            }
            for m in saved.methods
        ],
        repo_id=repo_id,
        forget_data=values.get("forget_data") or saved.forget_data,
        retain_data=values.get("retain_data") or saved.retain_data,
        evaluation=evaluation_rows(values.get("evaluation")),
        library_version=saved.library_version,
        license=values.get("license"),
        tags=list(values.get("tags") or []),
    )
    return render_model_card(info)


def is_local_base(name: str | None) -> bool:
    """Whether a base model named ``name`` is a folder of this machine (written as a local path, or a folder here),
    which a light repo cannot name: it would load nowhere else."""
    return bool(name) and (looks_like_local_path(name) or os.path.isdir(name))


def _repo_existed(api: Any, repo_id: str) -> bool:
    """Whether the repo exists before the push (``True`` when that cannot be told: a failed push then leaves the repo
    as it is). A name without a namespace is the token's user's, as ``create_repo`` reads it."""
    try:
        full = repo_id if "/" in repo_id else f"{api.whoami()['name']}/{repo_id}"
        return bool(api.repo_exists(full, repo_type="model"))
    except Exception:  # noqa: BLE001 - unknown means: never delete
        return True


def _delete_new_repo(api: Any, repo_id: str) -> None:
    """Delete the repo a failed push created (it holds nothing of the push), or say that it is left empty."""
    try:
        api.delete_repo(repo_id, repo_type="model")
    except Exception as err:  # the push's own error is the one to raise
        logger.warning(
            "The push failed and left the repo %s it created empty; deleting it failed: %s", repo_id, err
        )
    else:
        logger.warning("The push failed: the repo %s it had created is deleted again.", repo_id)


def _stale_companions(api: Any, repo_id: str, revision: str | None, folder: Path) -> list[str]:
    """The files an earlier push of an unlearned model wrote to the repo (the ``companion_files`` of its config at
    ``revision``: a full layout's base model and tokenizer files) that this push does not write: left there, a
    light push over a full one would leave the old weights for plain ``transformers`` (and the CLI's tokenizer
    lookup) to load. Files that no unlearned save wrote are kept, as a local save keeps them."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from .format import CONFIG_NAME

    try:
        path = api.hf_hub_download(repo_id, CONFIG_NAME, revision=revision)
        previous = read_config(Path(path).parent).companion_files
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return []  # no unlearned model there yet (a new branch starts from main: it was asked above)
    except ValueError as err:  # an unreadable config: its files are not ours to judge
        logger.warning(
            "The repo's previous %s could not be read (%s); its files are left as they are.", CONFIG_NAME, err
        )
        return []
    written = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return sorted(set(previous) - written)


def push_unlearned(
    model: Any,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    save_base_model: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    forget_skill: str | list[str] | None = None,
    retain_skills: list[str] | None = None,
    forget_data: str | None = None,
    retain_data: str | None = None,
    evaluation: Any = None,
    card_info: Any = None,
    license: str | None = None,
    tags: list[str] | None = None,
    tokenizer: Any = None,
    base_model_name_or_path: str | None = None,
    base_model_revision: str | None = None,
) -> CommitInfo:
    """Save ``model`` (see :func:`save_unlearned`) and upload it with a model card ``README.md`` in one commit.

    Args:
        repo_id: the Hub repo (``name`` or ``namespace/name``); created if it does not exist.
        private / token: as in ``HfApi.create_repo``; ``private=True`` refuses an existing public repo (the Hub
            would keep it public).
        commit_message: the commit title (default: ``"Upload unlearned model (unlearn_hf)"``).
        save_base_model: also upload the base model's files (full layout); default ``None``: light, unless the
            weights changed since the model was wrapped or loaded (see :func:`~.save.resolve_layout`).
        revision / create_pr: the branch to commit to, or open a pull request.
        forget_skill / retain_skills / forget_data / retain_data / evaluation / license / tags: what the model card
            says (they override the same keys of ``card_info``); ``forget_skill`` may list several skills (one Key
            Space Detection per skill). ``forget_data``/``retain_data`` are also stored in
            ``unlearn_config.json``. ``evaluation``: rows ``{"skill", "metric", "before", "after", "method"?}`` or a
            dict ``{skill: {"metric", "before", "after"}}``.
        card_info: a dict or :class:`unlearn_hf.model_card.ModelCardInfo` with the same keys.
        tokenizer: also upload this tokenizer.
        base_model_name_or_path / base_model_revision: see :func:`save_unlearned`.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the upload.
    """
    from huggingface_hub import HfApi

    values = _card_values(
        card_info,
        {
            "forget_skill": forget_skill,
            "retain_skills": retain_skills,
            "forget_data": forget_data,
            "retain_data": retain_data,
            "evaluation": evaluation,
            "license": license,
            "tags": tags,
        },
    )
    save_base_model = resolve_layout(model, save_base_model, base_model_name_or_path, {})
    local = base_name(model, base_model_name_or_path)
    if not save_base_model and is_local_base(local):
        raise ValueError(
            f"The base model is the local folder {local!r}: a light repo pushed from it loads nowhere else. "
            "Pass save_base_model=True, or base_model_name_or_path=<the base model's Hub id>."
        )
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="unlearn_hf-push-") as tmp:
        folder = Path(tmp) / "model"
        # Everything that can fail locally (saving, the card) runs before the repo is created.
        save_unlearned(
            model,
            folder,
            save_base_model=save_base_model,
            forget_data=values.get("forget_data"),
            retain_data=values.get("retain_data"),
            tokenizer=tokenizer,
            base_model_name_or_path=base_model_name_or_path,
            base_model_revision=base_model_revision,
        )
        card = build_model_card(folder, repo_id, values)  # fails here, before any request, on bad card values
        existed = _repo_existed(api, repo_id)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        full_id = url.repo_id
        try:
            if private and existed and not api.model_info(full_id).private:
                raise ValueError(
                    f"private=True, but the repo {full_id} exists and is public: a push does not change an "
                    "existing repo's visibility, so this one would be published. Make the repo private first "
                    "(HfApi().update_repo_settings(repo_id, private=True)), or push to a new repo."
                )
            # a new branch is created, as transformers' push_to_hub does
            if revision is not None and not create_pr:
                api.create_branch(full_id, branch=revision, exist_ok=True)
            if full_id != repo_id:
                card = build_model_card(folder, full_id, values)
            card.save(folder / "README.md")
            stale = _stale_companions(api, full_id, revision, folder) if existed else []
            info = api.upload_folder(
                repo_id=full_id,
                folder_path=folder,
                commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                revision=revision,
                create_pr=create_pr,
                delete_patterns=[glob.escape(name) for name in stale] or None,
            )
        except BaseException:
            if not existed:
                _delete_new_repo(api, full_id)
            raise
    logger.info("Pushed the unlearned model to %s (%s).", full_id, getattr(info, "oid", ""))
    return info
