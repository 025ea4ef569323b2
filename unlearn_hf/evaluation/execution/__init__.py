"""pass@1 for code skills (MBPP, HumanEval): run candidate code and its tests in a contained child process.

Running model-generated code is opt-in: :func:`run_program`, :func:`check_completion` and :func:`pass_at_1`
raise :class:`CodeExecutionNotAllowedError` unless called with ``allow_code_execution=True`` or with the
environment variable ``UNLEARN_HF_ALLOW_CODE_EXECUTION=1``;
an explicit ``allow_code_execution=False`` wins over the variable.

Each program runs under a fresh ``python -I`` supervisor that forks the program's process. On Linux, where the
kernel allows it, the program gets:

- **its own PID, network, IPC and UTS namespaces** (created directly by root, otherwise inside a user
  namespace): it sees only its own processes (``/proc`` is remounted), cannot signal or read anything of the
  caller's, has no network interface (not even loopback), and everything it started, ``setsid`` or not, dies
  with it or at the timeout (a PID namespace ends with its first process);
- **its own mount namespace**: the whole file system read-only and ``nosuid``; ``/home``, ``/root``, ``/tmp``,
  ``/var/tmp``, ``/run``, ``/dev/shm``, ``/mnt``, ``/media``, ``/srv`` and the caller's home replaced by empty
  directories (the Python installation and the program's own folder stay visible); a small private tmpfs as
  working directory;
- **a separate unprivileged uid** when the caller is root (one per concurrent program, unused by anything else,
  so the process limit holds and "kill everything of this uid" is safe), no capabilities, ``no_new_privs``, a
  non-dumpable process (its ``/proc/self/mem`` is closed to it);
- **a seccomp filter** refusing namespaces, mounts, ``ptrace``, ``bpf``, ``io_uring``, kernel keyrings and
  module loading, and every socket but ``AF_UNIX`` (x86-64 and aarch64);
- **resource limits**: address space, CPU seconds, file size, no core files, at most 16 processes;
- **a scrubbed environment** (``PATH``, ``LANG``, ``HOME``/``TMPDIR`` = its working directory) and its own session;
- **Python-level guards**, defence in depth rather than a boundary: an audit hook refusing process creation,
  signals, sockets, ``ctypes``, tracing, ``gc`` introspection and writes outside the working directory.

Where a mechanism is missing (an unprivileged caller without user namespaces, a container without
``CAP_SYS_ADMIN``, an old kernel, not Linux) the program still runs, without it, and a warning says once what is
not contained; :attr:`ExecutionResult.mechanisms` lists what was in effect. Without namespaces, root still hands
the program to its own uid (other users' files and processes stay out of reach, leftovers are killed by uid);
without namespaces and not as root, the program runs as the calling user and can read that user's files and
the environment of that user's processes: only the rlimits, the seccomp filter, the session and subreaper
clean-up and the Python-level guards remain.

A program counts as passed only if its process exits with status 0 *and* the caller gets back a random nonce that
only the end of the program can produce: the program's process reads it from a pipe (then closed) before the
code starts, keeps it only in the closure of an audit hook, and that hook writes it to the supervisor once the
code has returned from its last line (and only for an event raised by the guard's own frame); the supervisor
passes what it read to the caller over a pipe the program never holds. The nonce is never in the environment,
the command line, the output or a module, and the hook is reachable only through interpreter internals the
guards refuse (``gc``, ``ctypes``, tracing, signal handlers, ``/proc/self/mem``). So leaving early
(``sys.exit(0)``, ``os._exit(0)``, a killed process), printing things or writing to file descriptors never
passes. A program written to attack this bookkeeping from the inside may still forge a pass, as it can anyway by
returning an object that compares equal to everything: the verdict is best effort, the containment of the host
does not depend on it.

This is still not a VM: the program shares the host's kernel (a kernel exploit escapes), can read world-readable
files outside the hidden directories (and, running as the calling user, that user's own files there), uses CPU
and memory up to its limits, and reaches the unix sockets left visible, subject to their permissions. For
untrusted models at scale, add a container or VM.

The package: ``consent`` (the opt-in), ``programs`` (a completion and its tests as one program), ``runner``
(:func:`run_program`, :func:`pass_at_1`: the caller's side, which starts the supervisor and reads its report)
and the supervisor's standard-library-only files, run in the child process and never imported:
``supervisor.py`` (the ``python -I`` script: namespaces, fork, wait, clean-up), ``confinement.py`` (mounts,
identity, rlimits, seccomp) and ``guards.py`` (the audit hooks and the run of the candidate).
"""

from .consent import ALLOW_CODE_EXECUTION_ENV, CodeExecutionNotAllowedError
from .programs import build_program, extract_code
from .runner import ExecutionResult, check_completion, pass_at_1, run_program

__all__ = [
    "ALLOW_CODE_EXECUTION_ENV",
    "CodeExecutionNotAllowedError",
    "ExecutionResult",
    "build_program",
    "check_completion",
    "extract_code",
    "pass_at_1",
    "run_program",
]
