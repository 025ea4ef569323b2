"""The program pass@1 runs: a completion, cut out of its Markdown fence where needed, followed by the tests."""

from __future__ import annotations

import re

from ..items import EvalItem


def extract_code(completion: str) -> str:
    """The code inside the first Markdown code fence of ``completion``, or ``completion`` itself."""
    match = re.search(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", completion, flags=re.DOTALL)
    return match.group(1) if match else completion


def build_program(item: EvalItem, completion: str) -> str:
    """``program_prefix + completion + tests`` for an MBPP or HumanEval item.

    Without a prefix (MBPP) the completion is fence-stripped and its leading whitespace removed (the answer
    follows ``"Answer:"``); with one (HumanEval) it continues the prefix as is.
    """
    if item.test_code is None:
        raise ValueError(f"Item {item.id!r} has no test_code; pass@1 needs MBPP or HumanEval items.")
    code = completion if item.program_prefix else extract_code(completion).lstrip()
    return f"{item.program_prefix}{code}\n\n{item.test_code}\n"
