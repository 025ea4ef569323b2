"""``unlearn-hf push``: upload a saved unlearned model folder to the Hub, as it was saved."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import UserError, _one_line, load_model


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
        )
    except Exception as err:  # the Hub's answer (401, 404...) or no network: the user's to fix, one line
        if isinstance(err, OSError) or type(err).__module__.split(".")[0] in ("httpx", "httpx2", "requests"):
            raise UserError(f"Cannot push to {args.repo_id!r}: {_one_line(err)}") from err
        raise
    print(f"pushed to {url}")
    return 0
