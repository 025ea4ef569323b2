"""Saving an unlearned model: ``unlearn_config.json`` + ``unlearn_model.safetensors`` (+ the base model's own
files in the full layout), written atomically.

**Atomicity.** A save is written into a temporary sibling folder and swapped in by one atomic rename
(:mod:`.atomic`): killed at any moment, the folder holds the old checkpoint or the new one. The files of the old
folder that the previous save did not write (a user's notes) are carried over; those it wrote (the unlearning
files and the ``companion_files`` its config lists) are replaced. Nothing outside the folder and its temporary
sibling is written or deleted. In addition, the config records the sha256 of every tensor, so a config and a
tensor file from different saves are detected.
"""

from __future__ import annotations

import json
import logging
import os
import re
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import check_no_adapters
from ..context import is_unlearned_model
from ..sites.site_tensors import QUANTIZE_AFTER, is_packed_quantized
from ..version import __version__
from .atomic import replace_folder, resolve_target
from .config_schema import BaseModelInfo, SavedMethod, TensorRecord, UnlearnConfig
from .fingerprint import compute_fingerprint
from .format import CONFIG_NAME, LAYOUT_FULL, LAYOUT_LIGHT, WEIGHTS_NAME
from .weights_file import tensor_key, weights_metadata, write_weights

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def base_name(model: Any, base_model_name_or_path: str | None = None) -> str | None:
    """The base model's name or path a save records: the one given, else the base model's ``_name_or_path``."""
    return base_model_name_or_path or getattr(model.get_base_model().config, "_name_or_path", None) or None


def build_checkpoint(
    model: Any,
    *,
    save_base_model: bool = False,
    forget_data: str | None = None,
    retain_data: str | None = None,
    base_model_name_or_path: str | None = None,
    base_model_revision: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> tuple[UnlearnConfig, dict[str, torch.Tensor]]:
    """The config and the flat ``{<method>.<tensor>: tensor}`` dict of ``model``'s attached methods, validated
    (``state_dict``: the base weights the save writes, which the fingerprint records instead of the model's)."""
    if not is_unlearned_model(model):
        raise TypeError(f"Expected an UnlearnedModelForCausalLM, got {type(model).__name__}.")
    if not model.methods:
        raise ValueError("Nothing to save: no unlearning method is attached to this model.")
    for key, value in (("forget_data", forget_data), ("retain_data", retain_data)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{key} must be a text description (str), got {type(value).__name__}.")

    base = model.get_base_model()
    if save_base_model:
        check_no_adapters(base, "save the base model's files (save_base_model=True)")
    cfg = base.config
    name = base_name(model, base_model_name_or_path)
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
        fitted_with = None if method.fitted_with is None else list(method.fitted_with)
        methods.append(SavedMethod(mname, kind, values, records, fitted_with))

    config = UnlearnConfig(
        layout=LAYOUT_FULL if save_base_model else LAYOUT_LIGHT,
        base_model=BaseModelInfo(name, revision, compute_fingerprint(base, model.ffl_sites, state_dict)),
        methods=methods,
        library_version=__version__,
        forget_data=forget_data,
        retain_data=retain_data,
    )
    return config, flat


def resolve_layout(
    model: Any, save_base_model: bool | None, base_model_name_or_path: str | None, kwargs: dict[str, Any]
) -> bool:
    """Whether a save of ``model`` writes the base model's files (the full layout).

    ``save_base_model=None`` (the default) saves light unless the weights would be lost or misnamed: a
    ``state_dict`` to write was given, or the base model's parameters changed since it was wrapped or loaded (a
    ``Trainer`` fine-tuning the unlearned model, adapters merged into it), when a light checkpoint would name a base
    model whose weights are not these. ``False`` then raises, unless ``base_model_name_or_path`` names the base
    explicitly (the fingerprint checks it at load).
    """
    packed = (
        [n for n, m in model.named_modules() if is_packed_quantized(m)] if is_unlearned_model(model) else []
    )
    packed = [n for n in packed if n.rpartition(".")[0] not in packed]  # not their own packed parameters
    if packed:
        raise ValueError(
            f"Cannot save: {len(packed)} modules are quantized with packed weights ({', '.join(packed[:3])}), which "
            f"neither layout can record; {QUANTIZE_AFTER}."
        )
    if save_base_model:
        return True
    if kwargs.get("state_dict") is not None:
        if save_base_model is False:
            raise ValueError(
                "A state_dict was given with save_base_model=False: the light layout writes no weights, so they "
                "would be lost. Pass save_base_model=True (or leave it unset) to write them."
            )
        logger.info("A state_dict was given: saving the full layout (the base model's files with it).")
        return True
    if base_model_name_or_path is not None or not is_unlearned_model(model):
        return False  # a wrong type is refused by build_checkpoint
    changed = model.weights_changed()
    if not changed:
        return False
    name = base_name(model, None)
    named = (
        f"the base model it was loaded from ({name!r}), whose weights are not these"
        if name
        else "no base model"
    )
    why = (
        f"the base model's weights changed since it was wrapped or loaded ({'; '.join(changed)}), and a light "
        f"checkpoint would name {named}"
    )
    if save_base_model is False:
        raise ValueError(
            f"Cannot save light: {why}. Pass save_base_model=True, or base_model_name_or_path=<where these "
            "weights are saved>."
        )
    # once per model: a Trainer saves every checkpoint this way
    log = logger.info if model in _TOLD_FULL else logger.warning
    _TOLD_FULL.add(model)
    log("Saving the full layout (the base model's files with it): %s.", why)
    return True


#: Models already told that their default saves write the full layout.
_TOLD_FULL: weakref.WeakSet = weakref.WeakSet()


def save_unlearned(
    model: Any,
    save_directory: str | os.PathLike[str],
    *,
    save_base_model: bool | None = None,
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
        save_base_model: ``False``: the *light* layout, only ``unlearn_config.json`` and
            ``unlearn_model.safetensors``; loading resolves the base model from its recorded name (a Hub id or a
            local path) and revision. ``True``: the *full* layout, the base model's own files
            (``model.get_base_model().save_pretrained``) are saved in the same folder. ``None`` (default): light,
            unless a ``state_dict`` is given or the weights changed since the model was wrapped or loaded (see
            :func:`resolve_layout`: a ``Trainer`` fine-tuning an unlearned model saves full checkpoints).
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
    save_base_model = resolve_layout(model, save_base_model, base_model_name_or_path, kwargs)
    config, flat = build_checkpoint(
        model,
        save_base_model=save_base_model,
        forget_data=forget_data,
        retain_data=retain_data,
        base_model_name_or_path=base_model_name_or_path,
        base_model_revision=base_model_revision,
        state_dict=kwargs.get("state_dict") if save_base_model else None,
    )
    ignored = sorted(k for k, v in kwargs.items() if v is not None)  # Trainer passes state_dict=None
    if ignored and not save_base_model:
        logger.warning("Ignoring save arguments %s: they only apply with save_base_model=True.", ignored)

    target = resolve_target(save_directory)
    recorded = config.base_model.name_or_path
    # the recorded base model's name, read as a path, is this very folder (as the file system resolves both)
    names_target = bool(recorded) and Path(os.path.realpath(Path(recorded).expanduser())) == target
    if not save_base_model and names_target and any(WEIGHT_FILE.match(f) for f in _own_files(target)):
        raise ValueError(
            f"{target} is the full checkpoint the base model was loaded from: a light save there replaces it and "
            "deletes the base model's files. Save with save_base_model=True, or into another folder."
        )
    if not save_base_model and names_target:
        raise ValueError(
            f"The base model's name {recorded!r} is also the path of this folder ({target}): loading the light "
            "checkpoint would look for its base model in the folder itself, which holds none. Save into another "
            "folder, or with save_base_model=True."
        )

    foreign = set() if save_base_model or not target.is_dir() else _model_files(target) - _own_files(target)
    if foreign:
        raise ValueError(
            f"{target} holds another model's files that no unlearn_hf save wrote ({', '.join(sorted(foreign))}): next "
            "to a light checkpoint, AutoModelForCausalLM.from_pretrained and tools that read the folder would load "
            "them, not the base model it names. Save into another folder, or with save_base_model=True (which "
            "replaces them)."
        )

    def write(tmp: Path) -> list[str]:
        if save_base_model:
            model.get_base_model().save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        companions = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
        clash = sorted({CONFIG_NAME, WEIGHTS_NAME} & set(companions))
        if clash:
            raise ValueError(
                f"The base model or tokenizer wrote {clash}, which are the unlearning files' names."
            )
        config.companion_files = companions
        write_weights(tmp / WEIGHTS_NAME, flat, weights_metadata(config))
        (tmp / CONFIG_NAME).write_text(config.to_json(), encoding="utf-8")
        return [*companions, WEIGHTS_NAME, CONFIG_NAME]

    def not_carried(folder: Path) -> set[str]:
        own = _own_files(folder)
        if save_base_model:  # another model's weight files would shadow the new ones (its shards, its index)
            stale = {p.name for p in folder.glob("*") if WEIGHT_FILE.match(p.name)} - own
            if stale:
                logger.warning(
                    "Not keeping %s in %s: this save writes the base model's weights.", sorted(stale), folder
                )
            own |= stale
        return own

    replace_folder(target, write, not_carried)
    logger.info(
        "Saved %d unlearning method(s) to %s (%s layout).", len(config.methods), target, config.layout
    )
    return target


#: File names of transformers model weights (single file, shards, their index; pickle ones included).
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def _model_files(folder: Path) -> set[str]:
    """The files of ``folder`` that make it a transformers model: its ``config.json`` and weight files."""
    return {p.name for p in folder.iterdir() if p.name == "config.json" or WEIGHT_FILE.match(p.name)}


def _own_files(folder: Path) -> set[str]:
    """The files of ``folder`` that the previous save wrote: the two unlearning files and the companion files its
    config lists (read leniently: an unreadable config claims only the two unlearning files)."""
    own = {CONFIG_NAME, WEIGHTS_NAME}
    try:
        data = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        files = data.get("companion_files", []) if isinstance(data, dict) else []
    except (OSError, ValueError):
        return own
    if isinstance(files, list):
        own.update(f for f in files if isinstance(f, str))
    return own
