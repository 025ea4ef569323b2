"""pass@1 for code skills (MBPP, HumanEval): run candidate code and its tests in a limited child process.

Each program runs in a fresh ``python -I`` subprocess, in a temporary working directory, with a wall-clock
timeout (the whole process group is killed), CPU / memory / file-size limits, a minimal environment, and
network, subprocess and fork functions replaced by ones that raise. Nothing is executed in the calling
process. This keeps honest mistakes (infinite loops, huge allocations, stray file writes, network calls) from
hurting the host; it is not a security boundary against hostile code, for which use a container or VM.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .items import EvalItem
from .results import MetricResult

logger = logging.getLogger(__name__)

_GUARD = r"""
import os, sys
nonce = os.environ.pop("UNLEARN_HF_NONCE", "")
path, mem, cpu, fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
try:
    import resource
    for name, value in (("RLIMIT_AS", mem), ("RLIMIT_CPU", cpu), ("RLIMIT_FSIZE", fsize), ("RLIMIT_CORE", 0)):
        if value >= 0 and hasattr(resource, name):
            resource.setrlimit(getattr(resource, name), (value, value))
except (ImportError, ValueError, OSError):
    pass
import socket, _socket

def _blocked(*args, **kwargs):
    raise OSError("network and process creation are disabled in the unlearn_hf sandbox")

class _BlockedSocket(_socket.socket):
    def __init__(self, *args, **kwargs):
        _blocked()

socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = _BlockedSocket
for _mod in (socket, _socket):
    for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                  "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _blocked)
import subprocess
subprocess.Popen = _blocked
for _name in ("system", "popen", "fork", "forkpty", "execv", "execve", "execvp", "execvpe", "execl", "execle",
              "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp",
              "kill", "killpg"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked)
with open(path, encoding="utf-8") as f:
    source = f.read()
sys.argv = [path]
exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
sys.stdout.flush()
sys.stderr.write("\n" + nonce + "\n")
sys.stderr.flush()
"""


@dataclass
class ExecutionResult:
    """Outcome of one program run.

    Args:
        passed: the program ran to its end (all asserts held) within the limits.
        status: ``"passed"``, ``"failed"`` (exception, assertion, non-zero exit or early exit), ``"timeout"``.
        returncode: the child's exit status (``None`` after a timeout kill).
        stderr: the last 2,000 characters of its standard error.
        duration_s: wall-clock seconds.
    """

    passed: bool
    status: str
    returncode: int | None
    stderr: str
    duration_s: float


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


def run_program(
    program: str, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16
) -> ExecutionResult:
    """Run ``program`` in a limited ``python -I`` child process (see the module docstring)."""
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="unlearn_hf_exec_") as tmp:
        path = Path(tmp) / "candidate.py"
        path.write_text(program, encoding="utf-8")
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": tmp,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "UNLEARN_HF_NONCE": nonce,
        }
        cpu = max(1, int(timeout) + 1)
        limits = [str(memory_mb * 2**20), str(cpu), str(max_file_mb * 2**20)]
        with open(Path(tmp) / "stdout", "wb") as out, open(Path(tmp) / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _GUARD, str(path), *limits],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            try:
                returncode: int | None = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out, returncode = True, None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        stderr = (Path(tmp) / "stderr").read_bytes().decode("utf-8", errors="replace")
    duration = time.monotonic() - start
    finished = stderr.rstrip().endswith(nonce)
    stderr = stderr.replace(nonce, "").rstrip()[-2000:]
    if timed_out:
        return ExecutionResult(False, "timeout", None, stderr, duration)
    passed = returncode == 0 and finished
    return ExecutionResult(passed, "passed" if passed else "failed", returncode, stderr, duration)


def check_completion(
    item: EvalItem, completion: str, timeout: float = 10.0, memory_mb: int = 1024
) -> ExecutionResult:
    """Run ``completion`` against ``item``'s tests."""
    return run_program(build_program(item, completion), timeout=timeout, memory_mb=memory_mb)


def pass_at_1(
    items: Sequence[EvalItem],
    completions: Sequence[str],
    timeout: float = 10.0,
    memory_mb: int = 1024,
    n_workers: int | None = None,
    show_progress: bool = False,
) -> MetricResult:
    """Fraction of items whose (single, greedy) completion passes all its tests.

    Args:
        items: MBPP or HumanEval :class:`EvalItem` s (with ``test_code``).
        completions: one completion per item (the text generated after the prompt).
        timeout: seconds per program.
        memory_mb: address-space limit per program.
        n_workers: programs run at once (default: the number of CPUs, at most 8).
        show_progress: show a tqdm bar.

    Returns:
        :class:`MetricResult`; ``details["status"]`` lists each item's status.
    """
    if len(items) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(items)} items.")
    programs = [build_program(it, c) for it, c in zip(items, completions)]
    workers = n_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            tqdm(
                pool.map(lambda p: run_program(p, timeout=timeout, memory_mb=memory_mb), programs),
                total=len(programs),
                desc="pass@1",
                disable=not show_progress,
            )
        )
    per_item = [float(r.passed) for r in results]
    return MetricResult(
        name="pass_at_1",
        score=sum(per_item) / len(per_item) if per_item else float("nan"),
        n_items=len(per_item),
        per_item=per_item,
        abstained=[False] * len(per_item),
        details={"status": [r.status for r in results]},
    )
