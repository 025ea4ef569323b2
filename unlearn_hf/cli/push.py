"""``unlearn-hf push``: upload a saved unlearned model folder to the Hub, as it was saved."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import UserError, load_model


def cmd_push(args: argparse.Namespace) -> int:
    """Upload the folder as it was saved: its layout (a full folder with the base model's files), its tokenizer and
    the base model and data it names, so that the repo loads anywhere."""
    from ..persistence.format import CONFIG_NAME, LAYOUT_FULL

    path = Path(args.model) / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{args.model!r} is not a folder saved by unlearn_hf (no {CONFIG_NAME}).")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot read {path}: {err}") from err
    full = args.save_base_model or saved.get("layout") == LAYOUT_FULL
    base = saved.get("base_model") or {}
    base_name = base.get("name_or_path")
    if not full and base_name and (Path(base_name).is_absolute() or Path(base_name).is_dir()):
        raise UserError(
            f"{args.model} is a light folder whose base model is the local folder {base_name!r}: a repo pushed "
            "from it loads nowhere else. Pass --save-base-model to upload the base model's files too."
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
            base_model_name_or_path=None if full else base_name,
            base_model_revision=None if full else base.get("revision"),
            forget_data=saved.get("forget_data"),
            retain_data=saved.get("retain_data"),
        )
    except Exception as err:  # the Hub's answer (401, 404...) or no network: the user's to fix, one line
        if isinstance(err, OSError) or type(err).__module__.split(".")[0] in ("httpx", "httpx2", "requests"):
            raise UserError(f"Cannot push to {args.repo_id!r}: {' '.join(str(err).split())}") from err
        raise
    print(f"pushed to {url}")
    return 0
