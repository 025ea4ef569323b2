"""Saving an unlearned model: ``unlearn_config.json`` + ``unlearn_model.safetensors`` (+ the base model's own
files in the full layout), written atomically.

**Atomicity.** Everything is first written into a temporary folder next to the target (same file system). A new
target folder is then created by one rename. An existing folder is updated file by file in an order that never
leaves a folder that loads as a different model: the old ``unlearn_config.json`` is removed first (from then on the
folder refuses to load, with a clear error), then the base model / tokenizer files and
``unlearn_model.safetensors`` are moved in, and the new ``unlearn_config.json`` is moved in last (the commit
point). In addition, the config records the sha256 of every tensor, so a config and a tensor file from different
saves are detected. Files the user put in the folder (a tokenizer, notes) are left alone; only files that an
earlier save recorded as its own (``companion_files``) and that this save does not rewrite are removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch

from ..context import is_unlearned_model
from ..version import __version__
from .config_schema import BaseModelInfo, SavedMethod, TensorRecord, UnlearnConfig
from .fingerprint import compute_fingerprint
from .format import CONFIG_NAME, LAYOUT_FULL, LAYOUT_LIGHT, WEIGHTS_NAME
from .weights_file import tensor_key, weights_metadata

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def build_checkpoint(
    model: Any,
    *,
    save_base_model: bool = False,
    forget_data: str | None = None,
    retain_data: str | None = None,
    base_model_name_or_path: str | None = None,
    base_model_revision: str | None = None,
) -> tuple[UnlearnConfig, dict[str, torch.Tensor]]:
    """The config and the flat ``{<method>.<tensor>: tensor}`` dict of ``model``'s attached methods, validated."""
    if not is_unlearned_model(model):
        raise TypeError(f"Expected an UnlearnedModelForCausalLM, got {type(model).__name__}.")
    if not model.methods:
        raise ValueError("Nothing to save: no unlearning method is attached to this model.")
    for key, value in (("forget_data", forget_data), ("retain_data", retain_data)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{key} must be a text description (str), got {type(value).__name__}.")

    base = model.get_base_model()
    cfg = base.config
    name = base_model_name_or_path or getattr(cfg, "_name_or_path", None) or None
    if name is not None and os.path.isdir(name):
        name = os.path.abspath(name)
        if not save_base_model:
            logger.warning(
                "The base model is the local folder %s: this light checkpoint only loads where that folder exists "
                "(use save_base_model=True for a self-contained one).",
                name,
            )
    if not save_base_model and not name:
        raise ValueError(
            "The base model has no name or path (config._name_or_path is empty, e.g. a model built from a config): "
            "a light checkpoint could not find it again. Pass base_model_name_or_path=... or save_base_model=True."
        )
    revision = base_model_revision or getattr(cfg, "_commit_hash", None) or None

    methods: list[SavedMethod] = []
    flat: dict[str, torch.Tensor] = {}
    for mname, method in model.methods.items():
        state = method.state_dict()
        try:
            type(method).validate_state(state, method.config)
        except ValueError as err:
            raise ValueError(f"Method {mname!r} cannot be saved: {err}") from err
        values = method.config.to_dict()
        kind = values.pop("method_type")
        try:
            json.dumps(values, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Method {mname!r}: its config is not plain JSON values ({err}).") from err
        records = {}
        for tname, tensor in state.items():
            key = tensor_key(mname, tname)
            if key in flat:
                raise ValueError(f"Tensor key {key!r} is produced by two methods; rename one of them.")
            flat[key] = tensor.detach().to("cpu").clone().contiguous()  # safetensors refuses shared storage
            records[tname] = TensorRecord.of(tensor)
        methods.append(SavedMethod(mname, kind, values, records))

    config = UnlearnConfig(
        layout=LAYOUT_FULL if save_base_model else LAYOUT_LIGHT,
        base_model=BaseModelInfo(name, revision, compute_fingerprint(base, model.ffl_sites)),
        methods=methods,
        library_version=__version__,
        forget_data=forget_data,
        retain_data=retain_data,
    )
    return config, flat


def save_unlearned(
    model: Any,
    save_directory: str | os.PathLike[str],
    *,
    save_base_model: bool = False,
    forget_data: str | None = None,
    retain_data: str | None = None,
    base_model_name_or_path: str | None = None,
    base_model_revision: str | None = None,
    tokenizer: Any = None,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> Path | None:
    """Save the attached methods of ``model`` into ``save_directory`` (created if needed), atomically.

    Args:
        model: the unlearned model.
        save_directory: target folder. Other files in it are kept.
        save_base_model: ``False`` (default): the *light* layout, only ``unlearn_config.json`` and
            ``unlearn_model.safetensors``; loading resolves the base model from its recorded name (a Hub id or a
            local path) and revision. ``True``: the *full* layout, the base model's own files
            (``model.get_base_model().save_pretrained``) are saved in the same folder.
        forget_data / retain_data: optional text descriptions of the fitting data, stored in the config and shown
            on model cards.
        base_model_name_or_path / base_model_revision: record another base model id / revision than
            ``config._name_or_path`` / ``config._commit_hash`` (needed for a light save of a model built from a
            config, or to pin a Hub revision).
        tokenizer: also save this tokenizer in the folder.
        is_main_process: in distributed runs, only the main process writes (``False``: nothing is written).
        push_to_hub: not supported here; use ``model.push_to_hub(repo_id)``.
        kwargs: passed to the base model's ``save_pretrained`` in the full layout (e.g. ``max_shard_size``).

    Returns:
        The folder, or ``None`` when ``is_main_process`` is ``False``.
    """
    if push_to_hub:
        raise ValueError(
            "save_pretrained(push_to_hub=True) is not supported; call model.push_to_hub(repo_id)."
        )
    if kwargs.pop("safe_serialization", True) is False:
        raise ValueError(
            "safe_serialization=False is not supported: unlearn_hf only writes safetensors, never pickle."
        )
    if not is_main_process:
        return None
    config, flat = build_checkpoint(
        model,
        save_base_model=save_base_model,
        forget_data=forget_data,
        retain_data=retain_data,
        base_model_name_or_path=base_model_name_or_path,
        base_model_revision=base_model_revision,
    )
    if kwargs and not save_base_model:
        logger.warning(
            "Ignoring save arguments %s: they only apply with save_base_model=True.", sorted(kwargs)
        )

    target = Path(save_directory).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.unlearn-tmp-{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp)
    try:
        if save_base_model:
            model.get_base_model().save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        companions = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        clash = sorted({CONFIG_NAME, WEIGHTS_NAME} & set(companions))
        if clash:
            raise ValueError(
                f"The base model or tokenizer wrote {clash}, which are the unlearning files' names."
            )
        config.companion_files = companions
        safetensors.torch.save_file(flat, str(tmp / WEIGHTS_NAME), metadata=weights_metadata(config))
        (tmp / CONFIG_NAME).write_text(config.to_json(), encoding="utf-8")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(tmp / name)
        _commit(tmp, target, companions)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "Saved %d unlearning method(s) to %s (%s layout).", len(config.methods), target, config.layout
    )
    return target


# -- filesystem steps (module functions so that tests can interrupt them) ------------------------------------------
def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove(path: Path) -> None:
    path.unlink()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _old_companions(target: Path) -> list[str]:
    """Companion files recorded by the previous save in ``target`` (lenient: [] when unreadable)."""
    try:
        data = json.loads((target / CONFIG_NAME).read_text(encoding="utf-8"))
        files = data.get("companion_files", [])
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(files, list):
        return []
    out = []
    for rel in files:
        if isinstance(rel, str) and rel and not Path(rel).is_absolute() and ".." not in Path(rel).parts:
            out.append(rel)
    return out


def _commit(tmp: Path, target: Path, companions: list[str]) -> None:
    """Move the files of ``tmp`` into ``target`` so that an interruption never leaves a folder that loads as a
    different model (see the module docstring)."""
    if not target.exists():
        _replace(tmp, target)
        _fsync_dir(target.parent)
        return
    old = _old_companions(target)
    if (target / CONFIG_NAME).exists():
        _remove(target / CONFIG_NAME)  # from here until the last step the folder refuses to load
        _fsync_dir(target)
    for rel in companions:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        _replace(tmp / rel, target / rel)
    _replace(tmp / WEIGHTS_NAME, target / WEIGHTS_NAME)
    _replace(tmp / CONFIG_NAME, target / CONFIG_NAME)  # commit point
    _fsync_dir(target)
    for rel in sorted(set(old) - set(companions)):
        stale = target / rel
        if stale.is_file():
            stale.unlink()
            logger.info("Removed %s, written by the previous save and not part of this one.", stale)
