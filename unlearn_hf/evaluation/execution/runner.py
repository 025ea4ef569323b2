"""The caller's side of pass@1: start the sandbox supervisor for each program and read back its verdict.

The supervisor (``supervisor.py`` next to this file) runs as ``python -I <its path> <config JSON>``; see the
package docstring for what it contains and how a pass is proven.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..items import EvalItem
from ..results import MetricResult
from .consent import check_allowed
from .programs import build_program

logger = logging.getLogger(__package__)  # the package's logger, "unlearn_hf.evaluation.execution"

_SUPERVISOR = Path(__file__).resolve().with_name("supervisor.py")
_MAX_PROCESSES = 16
_UID_BASE = 1_500_000_000  # unprivileged uids for programs started by root: base + 64 * pid + slot
_UID_SLOTS = 64
_SUPERVISOR_GRACE_S = 10.0
# Mechanisms to leave out, for tests of the degraded paths: "namespaces", "python-guards", and "root" (a root
# caller behaves as an unprivileged one: the supervisor first becomes the program's uid).
_disabled_mechanisms: frozenset[str] = frozenset()
_warned: set[str] = set()
_warn_lock = threading.Lock()
_slots_lock = threading.Condition()
_slots_used: set[int] = set()


@dataclass
class ExecutionResult:
    """Outcome of one program run.

    Args:
        passed: the program ran to its end (all asserts held) within the limits.
        status: ``"passed"``, ``"failed"`` (exception, assertion, non-zero exit or early exit), ``"timeout"``.
        returncode: the program's exit status, negative for a signal (``None`` after a timeout kill).
        stderr: the last 2,000 characters of its standard error.
        duration_s: wall-clock seconds.
        mechanisms: the containment mechanisms that were in effect (``"pid-namespace"``, ``"separate-uid"``, ...).
    """

    passed: bool
    status: str
    returncode: int | None
    stderr: str
    duration_s: float
    mechanisms: tuple[str, ...] = ()


@contextmanager
def _sandbox_uid() -> Iterator[int | None]:
    """An unused unprivileged uid for one program when running as root (``None`` otherwise)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        yield None
        return
    with _slots_lock:
        while len(_slots_used) >= _UID_SLOTS:
            _slots_lock.wait()
        slot = min(set(range(_UID_SLOTS)) - _slots_used)
        _slots_used.add(slot)
    try:
        yield _UID_BASE + _UID_SLOTS * os.getpid() + slot
    finally:
        with _slots_lock:
            _slots_used.discard(slot)
            _slots_lock.notify()


def _warn_once(notes: Sequence[str]) -> None:
    with _warn_lock:
        new = [n for n in notes if n not in _warned]
        _warned.update(new)
    if new:
        logger.warning(
            "Generated code is not fully contained on this machine: %s. See the 'Code execution' section of "
            "the README.",
            "; ".join(new),
        )


def _read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks)


def run_program(
    program: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_file_mb: int = 16,
    *,
    allow_code_execution: bool | None = None,
) -> ExecutionResult:
    """Run ``program`` in a contained child process (see the package docstring).

    Args:
        program: Python source; it passes if it runs to its end.
        timeout: wall-clock seconds before the program and everything it started are killed.
        memory_mb: address-space limit.
        max_file_mb: size limit of each file it writes (its working directory holds twice that).
        allow_code_execution: consent to run the code; ``None`` reads ``UNLEARN_HF_ALLOW_CODE_EXECUTION=1``.

    Raises:
        CodeExecutionNotAllowedError: without consent.
    """
    check_allowed(allow_code_execution)
    nonce = secrets.token_hex(16).encode()
    start = time.monotonic()
    with (
        _sandbox_uid() as uid,
        tempfile.TemporaryDirectory(prefix="unlearn_hf_exec_", ignore_cleanup_errors=True) as tmp,
    ):
        work, path = Path(tmp) / "work", Path(tmp) / "candidate.py"
        work.mkdir(mode=0o700)
        path.write_text(program, encoding="utf-8")
        path.chmod(0o644)
        Path(tmp).chmod(0o711)
        if uid is not None:
            os.chown(work, uid, uid)
        cfg = {
            "timeout": float(timeout),
            "memory": int(memory_mb) * 2**20,
            "cpu": max(1, int(timeout) + 1),
            "fsize": int(max_file_mb) * 2**20,
            "nproc": _MAX_PROCESSES,
            "uid": uid,
            "tmp": tmp,
            "work": str(work),
            "program": str(path),
            "guards": "python-guards" not in _disabled_mechanisms,
            "disabled": sorted(_disabled_mechanisms),
        }
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
        }
        nonce_r, nonce_w = os.pipe()
        result_r, result_w = os.pipe()
        proc = None
        try:
            os.write(nonce_w, nonce)
            os.close(nonce_w)
            nonce_w = -1
            cfg.update(nonce_fd=nonce_r, result_fd=result_w)
            with open(Path(tmp) / "stdout", "wb") as out, open(Path(tmp) / "stderr", "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-I", str(_SUPERVISOR), json.dumps(cfg)],
                    cwd=tmp,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    pass_fds=(nonce_r, result_w),
                    start_new_session=True,
                )
            os.close(result_w)
            result_w = -1
            try:
                proc.wait(timeout=timeout + _SUPERVISOR_GRACE_S)
                backstop = False
            except subprocess.TimeoutExpired:
                backstop = True
        finally:
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
            raw = _read_available(result_r)
            for fd in (nonce_r, nonce_w, result_r, result_w):
                if fd >= 0:
                    os.close(fd)
        stderr = (Path(tmp) / "stderr").read_bytes().decode("utf-8", errors="replace")[-2000:]
    duration = time.monotonic() - start
    try:
        report = json.loads(raw)
    except ValueError:
        report = None
    if report is None:
        logger.warning("The sandbox supervisor ended without a report (exit status %s).", proc.returncode)
        timed_out = backstop
        return ExecutionResult(False, "timeout" if timed_out else "failed", None, stderr, duration)
    _warn_once(report["notes"])
    mechanisms = tuple(report["on"])
    if report["timed_out"] or backstop:
        return ExecutionResult(False, "timeout", None, stderr, duration, mechanisms)
    returncode = report["returncode"]
    passed = returncode == 0 and bytes.fromhex(report["done"]) == nonce
    return ExecutionResult(passed, "passed" if passed else "failed", returncode, stderr, duration, mechanisms)


def check_completion(
    item: EvalItem,
    completion: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    *,
    allow_code_execution: bool | None = None,
) -> ExecutionResult:
    """Run ``completion`` against ``item``'s tests (opt-in as for :func:`run_program`)."""
    return run_program(
        build_program(item, completion),
        timeout=timeout,
        memory_mb=memory_mb,
        allow_code_execution=allow_code_execution,
    )


def pass_at_1(
    items: Sequence[EvalItem],
    completions: Sequence[str],
    timeout: float = 10.0,
    memory_mb: int = 1024,
    n_workers: int | None = None,
    show_progress: bool = False,
    *,
    allow_code_execution: bool | None = None,
) -> MetricResult:
    """Fraction of items whose (single, greedy) completion passes all its tests.

    Args:
        items: MBPP or HumanEval :class:`EvalItem` s (with ``test_code``).
        completions: one completion per item (the text generated after the prompt).
        timeout: seconds per program.
        memory_mb: address-space limit per program.
        n_workers: programs run at once (default: the number of CPUs, at most 8).
        show_progress: show a tqdm bar.
        allow_code_execution: consent to run the generated code (see :func:`run_program`); ``None`` reads the
            environment variable ``UNLEARN_HF_ALLOW_CODE_EXECUTION=1``.

    Returns:
        :class:`MetricResult`; ``details["status"]`` lists each item's status.

    Raises:
        CodeExecutionNotAllowedError: without consent.
    """
    check_allowed(allow_code_execution)
    if len(items) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(items)} items.")
    programs = [build_program(it, c) for it, c in zip(items, completions)]
    workers = n_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            tqdm(
                pool.map(
                    lambda p: run_program(p, timeout=timeout, memory_mb=memory_mb, allow_code_execution=True),
                    programs,
                ),
                total=len(programs),
                desc="pass@1",
                disable=not show_progress,
            )
        )
    per_item = [float(r.passed) for r in results]
    return MetricResult.mean_of("pass_at_1", per_item, {"status": [r.status for r in results]})
