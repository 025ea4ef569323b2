"""The opt-in: running model-generated code needs the caller's explicit consent (see the package docstring)."""

from __future__ import annotations

import os

ALLOW_CODE_EXECUTION_ENV = "UNLEARN_HF_ALLOW_CODE_EXECUTION"


class CodeExecutionNotAllowedError(PermissionError):
    """Raised when pass@1 would run generated code without the caller's explicit consent."""


def check_allowed(allow_code_execution: bool | None) -> None:
    if allow_code_execution is None:
        allow_code_execution = os.environ.get(ALLOW_CODE_EXECUTION_ENV, "").strip() == "1"
    if not allow_code_execution:
        raise CodeExecutionNotAllowedError(
            "pass@1 runs model-generated Python programs (MBPP/HumanEval completions and their tests) on this "
            "machine, in a contained child process that is still not a VM (see unlearn_hf.evaluation.execution "
            "and the README's 'Code execution' section). To allow it, pass allow_code_execution=True or set the "
            f"environment variable {ALLOW_CODE_EXECUTION_ENV}=1 (the command line runs no generated code)."
        )
