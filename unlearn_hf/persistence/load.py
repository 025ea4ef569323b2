"""Loading an unlearned model from a local folder or a Hub repo, or attaching saved unlearning to a model in memory.

Everything that can be checked without the base model is checked first (config, tensor file integrity, method
configs and states), so a bad folder fails before any weights are loaded. Attaching is all-or-nothing: when a
method fails to attach, the methods attached by this call are removed again, so a model given as ``base_model``
is left without any hook.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..context import is_unlearned_model
from ..fit_context import checks_paused
from ..sites import SiteError
from .atomic import interrupted_swap
from .base_class import base_auto_class
from .config_file import read_config
from .config_schema import UnlearnConfig
from .fingerprint import check_fingerprint
from .format import (
    CONFIG_NAME,
    LAYOUT_FULL,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    FingerprintMismatchError,
    UnlearnFormatError,
    looks_like_local_path,
)
from .weights_file import read_weights

if TYPE_CHECKING:
    from ..methods.base import UnlearningMethod
logger = logging.getLogger(__name__)

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class _Source:
    """Where the unlearning files were found: a local folder, possibly a Hub snapshot of ``repo_id`` at ``commit``."""

    folder: Path
    repo_id: str | None = None
    commit: str | None = None

    def describe(self) -> str:
        if self.repo_id is None:
            return str(self.folder)
        return f"{self.repo_id}@{self.commit}" if self.commit else self.repo_id


class SavedSites:
    """A site override that takes the FFL modules by the full names recorded at save time."""

    def __init__(self, pairs: list[tuple[str | None, str, str | None]]) -> None:
        self.pairs = pairs

    def __call__(self, model: nn.Module) -> list[tuple[nn.Module | None, nn.Module, str | None]]:
        out = []
        for pre, key, gate in self.pairs:
            try:
                out.append(
                    (None if pre is None else model.get_submodule(pre), model.get_submodule(key), gate)
                )
            except AttributeError as err:
                raise SiteError(
                    f"The saved FFL site modules {pre!r} / {key!r} do not exist in this model."
                ) from err
        return out

    def __repr__(self) -> str:
        return f"SavedSites({len(self.pairs)} layers, e.g. {self.pairs[0] if self.pairs else None})"


def resolve_source(
    path_or_repo_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> _Source:
    """Find the unlearning files: a local folder, or a Hub repo id downloaded through ``huggingface_hub``
    (``snapshot_download``: revision, cache, ``HF_HUB_OFFLINE`` all apply). Only ``unlearn_config.json`` and
    ``unlearn_model.*`` are fetched here."""
    name = os.fspath(path_or_repo_id)
    path = Path(name).expanduser()
    if path.is_dir():
        if revision not in (None, "main"):
            logger.info("Ignoring revision=%r: %s is a local folder.", revision, path)
        return _Source(path)
    if path.is_file():
        note = ""
        if path.suffix in PICKLE_SUFFIXES:
            note = " Pickle-based files are refused (unlearn_hf never unpickles)."
        raise UnlearnFormatError(
            f"{path} is a file; expected a folder (or a Hub repo id) holding {CONFIG_NAME} and {WEIGHTS_NAME}.{note}"
        )
    previous = interrupted_swap(path.absolute())
    if previous is not None:
        logger.warning(
            "%s does not exist: a save into it was killed halfway; loading the previous checkpoint from %s (the "
            "next save there puts it back).",
            path,
            previous,
        )
        return _Source(previous)
    if looks_like_local_path(name):
        raise FileNotFoundError(f"{path} does not exist (and is not a Hub repo id).")
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo_id=name,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        force_download=force_download,
        local_files_only=local_files_only,
        allow_patterns=[CONFIG_NAME, "unlearn_model.*"],
    )
    folder = Path(folder)
    commit = folder.name if _COMMIT_RE.match(folder.name) else None
    return _Source(folder, repo_id=name, commit=commit)


def build_methods(
    wrapper_cls: type, config: UnlearnConfig, source: str, folder: Path
) -> list[tuple[str, UnlearningMethod]]:
    """Read the tensors and build every method (config + validated state), attached to nothing yet."""
    unknown = [m.method_type for m in config.methods if m.method_type not in wrapper_cls.method_classes]
    if unknown:
        raise UnlearnFormatError(
            f"{source}: no implementation of method type(s) {unknown} in {wrapper_cls.__name__}.method_classes "
            f"(known: {sorted(wrapper_cls.method_classes)})."
        )
    tensors = read_weights(folder, config)
    out = []
    for saved in config.methods:
        method_cls = wrapper_cls.method_classes[saved.method_type]
        where = f"{source}: method {saved.name!r} ({saved.method_type})"
        try:
            method_config = method_cls.config_class.from_dict(
                {**saved.config, "method_type": saved.method_type}
            )
        except (TypeError, ValueError) as err:
            raise UnlearnFormatError(f"{where}: invalid config: {err}") from err
        try:
            method = method_cls(method_config, tensors[saved.name])
        except (TypeError, ValueError) as err:
            raise UnlearnFormatError(f"{where}: invalid fitted state: {err}") from err
        if saved.fitted_with is not None:
            method.fitted_with = tuple(saved.fitted_with)
        out.append((saved.name, method))
    return out


def _wrap(wrapper_cls: type, base: nn.Module, config: UnlearnConfig) -> Any:
    """Wrap ``base`` with the FFL sites the unlearning was fitted on (by their saved module names)."""
    saved = [
        (s.get("pre"), s.get("key"), s.get("gate"))
        for s in config.base_model.fingerprint.get("ffl_sites") or []
    ]
    wrapper = wrapper_cls.from_base(base)
    try:
        detected = [(s.pre_name, s.key_name, s.gate) for s in wrapper.ffl_sites]
    except SiteError:
        detected = None
    if detected == saved or not saved:
        return wrapper
    if detected is not None and len(detected) != len(saved):
        return wrapper  # another architecture: the fingerprint check reports it
    try:  # from_base checks the saved names against this model
        candidate = wrapper_cls.from_base(base, sites=SavedSites(saved))
    except SiteError as err:
        if detected is None:
            raise FingerprintMismatchError(
                f"The FFL sites the unlearning was fitted on cannot be found in this {type(base).__name__}: {err}"
            ) from err
        return wrapper  # the fingerprint check reports the differing sites
    return candidate


def attach_saved(
    wrapper_cls: type,
    base: nn.Module,
    config: UnlearnConfig,
    methods: list[tuple[str, UnlearningMethod]],
    *,
    ignore_fingerprint: bool = False,
    source: str = "",
) -> Any:
    """Check the fingerprint, then attach every method to ``base`` (a plain model or an existing unlearned one),
    all or nothing."""
    if is_unlearned_model(base):
        wrapper = base
        clash = sorted(set(wrapper.methods) & {n for n, _ in methods})
        if clash:
            raise ValueError(f"Methods named {clash} are already attached to the given model.")
    else:
        wrapper = _wrap(wrapper_cls, base, config)
    check_layers(config, methods, len(wrapper.ffl_sites), source)
    check_fingerprint(
        config.base_model.fingerprint,
        wrapper.get_base_model(),
        wrapper.ffl_sites,
        ignore=ignore_fingerprint,
        source=source,
    )
    added: list[str] = []
    with checks_paused(wrapper):  # checked once, with every saved method attached
        try:
            for name, method in methods:
                wrapper.add_method(name, method)
                added.append(name)
        except BaseException:
            for name in reversed(added):
                wrapper.remove_method(name)
            raise
    return wrapper


def _load_base(
    config: UnlearnConfig,
    src: _Source,
    model_args: tuple,
    base_kwargs: dict[str, Any],
    *,
    base_model_name_or_path: str | None,
    base_model_revision: str | None,
    hub_kwargs: dict[str, Any],
) -> nn.Module:

    own_files = config.layout == LAYOUT_FULL and base_model_name_or_path is None
    if own_files:
        if src.repo_id is not None:
            name, revision = src.repo_id, src.commit
        else:
            name, revision = str(src.folder), None
        base_kwargs.setdefault(
            "use_safetensors", True
        )  # never unpickle base weights shipped with a checkpoint
    else:
        name = base_model_name_or_path or config.base_model.name_or_path
        revision = base_model_revision or config.base_model.revision
        if not name:
            raise UnlearnFormatError(
                f"{src.describe()}: the saved config names no base model; pass base_model_name_or_path=... or "
                "base_model=..."
            )
    if "torch_dtype" in base_kwargs and "dtype" not in base_kwargs:
        base_kwargs["dtype"] = base_kwargs.pop("torch_dtype")
    kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    if revision is not None:
        kwargs["revision"] = revision
    logger.info("Loading the base model %s%s", name, f" @ {revision}" if revision else "")
    try:
        auto = base_auto_class(name, kwargs, base_kwargs, config.base_model.fingerprint.get("model_type"))
        base = auto.from_pretrained(name, *model_args, **kwargs, **base_kwargs)
    except OSError as err:
        if own_files and base_kwargs.get("use_safetensors") and _has_pickled_weights(src.folder):
            raise UnlearnFormatError(
                f"{src.describe()}: the full checkpoint's base model weights are pickle files (pytorch_model.bin), "
                "refused: loading a pickle can run arbitrary code. Re-save it with save_base_model=True (safetensors)."
            ) from err
        raise OSError(
            f"Could not load the base model {name!r}{f' (revision {revision})' if revision else ''} of the "
            f"unlearned model {src.describe()}: {err}\nPass base_model_name_or_path=... or an already loaded "
            "base_model=... if it lives elsewhere."
        ) from err
    except (
        ValueError
    ) as err:  # a folder or repo that holds no model (transformers: "Unrecognized model in ...")
        raise ValueError(
            f"Could not load the base model {name!r} of the unlearned model {src.describe()}: {err}"
        ) from err
    if revision is not None and _COMMIT_RE.match(str(revision)):
        base.config._commit_hash = str(revision)  # remembered for a later light save (not serialized)
    return base


def _has_pickled_weights(folder: Path) -> bool:
    return any(p.suffix in PICKLE_SUFFIXES for p in folder.glob("pytorch_model*"))


def check_layers(config: UnlearnConfig, methods: list[tuple[str, Any]], n_layers: int, source: str) -> None:
    """Every layer a saved method names (its config's ``layers``, its ``layer_index`` tensor) exists in a model
    with ``n_layers`` FFL layers (negative config layers count from the end); checked before anything is
    attached."""
    for name, method in methods:
        layers = getattr(method.config, "layers", None)
        bad = {i for i in layers if not -n_layers <= i < n_layers} if isinstance(layers, list) else set()
        index = method.state_dict().get("layer_index")
        if index is not None and index.numel():
            bad |= {i for i in (int(index.min()), int(index.max())) if not 0 <= i < n_layers}
        bad = sorted(bad)
        if bad:
            raise UnlearnFormatError(
                f"{source}: method {name!r} names layers {bad}, but the model has {n_layers} FFL layers "
                f"(0..{n_layers - 1})."
            )


def load_unlearned(
    wrapper_cls: type,
    pretrained_model_name_or_path: str | os.PathLike[str],
    *model_args: Any,
    base_model: nn.Module | None = None,
    revision: str | None = None,
    ignore_fingerprint: bool = False,
    base_model_name_or_path: str | None = None,
    base_model_revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    **base_kwargs: Any,
) -> Any:
    """Load an unlearned model saved with ``save_pretrained`` / ``push_to_hub``.

    Args:
        wrapper_cls: ``UnlearnedModelForCausalLM`` or a subclass (its ``method_classes`` build the methods).
        pretrained_model_name_or_path: a local folder or a Hub repo id.
        model_args: passed to the base model's ``from_pretrained``.
        base_model: attach the saved unlearning to this model already in memory instead of loading one (a plain
            model, or an unlearned model to which the saved methods are added).
        revision: revision of the unlearned repo on the Hub (branch, tag or commit).
        ignore_fingerprint: attach even if the base model's fingerprint differs from the saved one (a warning
            lists the differences).
        base_model_name_or_path / base_model_revision: load the base model from elsewhere than recorded (light
            layout; or instead of the folder's own files in the full layout).
        cache_dir / token / force_download / local_files_only: Hub download options, used for the unlearning files
            and the base model.
        base_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` for the base model (``dtype`` /
            ``torch_dtype``, ``device_map``, ``attn_implementation``, ...).

    Raises:
        UnlearnFormatError: missing, corrupted or inconsistent files, unknown method types, invalid states,
            newer format version.
        FingerprintMismatchError: the base model is not the one the unlearning was fitted on.
    """
    if kwargs_subfolder := base_kwargs.pop("subfolder", None):
        raise ValueError(f"subfolder={kwargs_subfolder!r} is not supported for unlearned models.")
    hub_kwargs = {"cache_dir": cache_dir, "token": token, "force_download": force_download}
    src = resolve_source(
        pretrained_model_name_or_path,
        revision=revision,
        local_files_only=local_files_only,
        **hub_kwargs,
    )
    where = src.describe()
    if src.repo_id is not None and not (src.folder / CONFIG_NAME).is_file():
        raise UnlearnFormatError(
            f"No {CONFIG_NAME} in the Hub repo {where}: it holds no saved unlearning (a plain transformers model "
            "loads with AutoModelForCausalLM)."
        )
    config = read_config(src.folder)
    methods = build_methods(wrapper_cls, config, where, src.folder)

    if base_model is not None:
        if model_args or base_kwargs:
            raise TypeError(
                "Base model loading arguments "
                f"{sorted(base_kwargs) + (['*model_args'] if model_args else [])} have no effect with base_model=."
            )
        return attach_saved(
            wrapper_cls, base_model, config, methods, ignore_fingerprint=ignore_fingerprint, source=where
        )

    base = _load_base(
        config,
        src,
        model_args,
        dict(base_kwargs),
        base_model_name_or_path=base_model_name_or_path,
        base_model_revision=base_model_revision,
        hub_kwargs={**hub_kwargs, "local_files_only": local_files_only or None},
    )
    return attach_saved(
        wrapper_cls, base, config, methods, ignore_fingerprint=ignore_fingerprint, source=where
    )
