"""Opt-in and containment of pass@1 code execution: hostile snippets must not reach the test process.

Every containment test runs with the Python-level guards on (what ships) and, where the snippet needs process
creation or native calls, with them off, to show that the operating-system layer holds on its own. Where this
machine lacks a mechanism, the tests assert the documented degraded behaviour (a warning) instead.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from unlearn_hf.evaluation import CodeExecutionNotAllowedError, execution
from unlearn_hf.evaluation.execution import check_completion, pass_at_1, run_program, runner
from unlearn_hf.evaluation.items import EvalItem

LOGGER = "unlearn_hf.evaluation.execution"


@dataclass
class Machine:
    mechanisms: set[str]
    warnings: list[str]

    def provides(self, *mechanisms: str) -> bool:
        """Whether any of ``mechanisms`` is in effect; if none is, the degradation must have been announced."""
        if self.mechanisms & set(mechanisms):
            return True
        assert self.warnings, f"none of {mechanisms} in effect and no warning was logged"
        return False


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run_capturing_warnings(program: str, **kwargs) -> tuple[execution.ExecutionResult, list[str]]:
    handler = _Records()
    logging.getLogger(LOGGER).addHandler(handler)
    saved = set(runner._warned)
    runner._warned.clear()
    try:
        return run(program, **kwargs), handler.messages
    finally:
        logging.getLogger(LOGGER).removeHandler(handler)
        runner._warned.update(saved)


@pytest.fixture(scope="module")
def machine() -> Machine:
    result, warnings = _run_capturing_warnings("pass\n")
    assert result.passed, result.stderr
    return Machine(set(result.mechanisms), warnings)


@pytest.fixture(params=["guards", "no-guards"])
def guards(request, monkeypatch) -> str:
    if request.param == "no-guards":
        monkeypatch.setattr(runner, "_disabled_mechanisms", frozenset({"python-guards"}))
    return request.param


@pytest.fixture
def open_dir():
    """A world-writable folder outside the program's: only a mount namespace keeps the program out of it."""
    path = Path(tempfile.mkdtemp(prefix="unlearn_victim_"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(program: str, timeout: float = 5.0, **kwargs) -> execution.ExecutionResult:
    return run_program(program, timeout=timeout, allow_code_execution=True, **kwargs)


def processes_with(token: str) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                found.append(int(name))
        except OSError:
            pass
    return found


def wait_gone(token: str, seconds: float = 2.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := processes_with(token)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# ---------------------------------------------------------------------------------------------------- opt-in


def test_code_execution_requires_opt_in(monkeypatch):
    monkeypatch.delenv(execution.ALLOW_CODE_EXECUTION_ENV, raising=False)
    item = EvalItem("p", "a", test_code="assert True\n")
    for call in (
        lambda **kw: run_program("print('ok')", **kw),
        lambda **kw: check_completion(item, "x = 1", **kw),
        lambda **kw: pass_at_1([item], ["x = 1"], **kw),
    ):
        with pytest.raises(CodeExecutionNotAllowedError) as info:
            call()
        assert isinstance(info.value, PermissionError)
        message = str(info.value)
        for how in (
            "allow_code_execution=True",
            "UNLEARN_HF_ALLOW_CODE_EXECUTION=1",
        ):
            assert how in message
        with pytest.raises(CodeExecutionNotAllowedError):
            call(allow_code_execution=False)
    monkeypatch.setenv(execution.ALLOW_CODE_EXECUTION_ENV, "0")
    with pytest.raises(CodeExecutionNotAllowedError):
        run_program("print('ok')")
    monkeypatch.setenv(execution.ALLOW_CODE_EXECUTION_ENV, "1")
    assert run_program("print('ok')").passed
    assert pass_at_1([item], ["x = 1"]).score == 1.0
    with pytest.raises(CodeExecutionNotAllowedError):  # an explicit False wins over the variable
        run_program("print('ok')", allow_code_execution=False)


# ----------------------------------------------------------------------------------------- honest programs


def test_honest_programs_and_mechanisms(machine):
    assert run("def f(x):\n    return x + 1\n\nassert f(1) == 2\n").status == "passed"
    failed = run("assert 1 + 1 == 3, 'wrong'\n")
    assert failed.status == "failed" and "AssertionError: wrong" in failed.stderr
    assert "candidate.py" in failed.stderr and "guards.py" not in failed.stderr  # no supervisor frames
    assert "SyntaxError" in run("def f(:\n").stderr
    slow = run(
        "while True:\n    pass\n", timeout=1
    )  # killed at its timeout: the status says so, no clock needed
    assert slow.status == "timeout" and slow.returncode is None
    files = run("open('f.txt', 'w').write('x')\nimport os\nassert os.listdir('.') == ['f.txt']\n")
    assert files.passed, files.stderr
    if os.geteuid() == 0:  # root can always hand the program to another uid
        assert "separate-uid" in machine.mechanisms
    full = {"pid-namespace", "network-namespace", "mount-namespace", "rlimits", "python-guards"}
    assert full <= machine.mechanisms or machine.warnings


# ------------------------------------------------------------------------------------ (a) the environment


def test_parent_environment_is_not_readable(machine, guards, monkeypatch):
    secret = "unlearn-secret-" + secrets.token_hex(8)
    monkeypatch.setenv("UNLEARN_SECRET_TEST", secret)
    # /proc/<pid>/environ shows a process's initial environment: a helper started with the secret stands
    # for a parent that got its token at start-up.
    helper = subprocess.Popen(["sleep", "30"], env={**os.environ})
    try:
        deadline = time.monotonic() + 5
        while secret.encode() not in Path(f"/proc/{helper.pid}/environ").read_bytes():  # until it has exec'd
            assert time.monotonic() < deadline
            time.sleep(0.01)
        program = f"""
import os
secret = {secret!r}
leaks = [k for k, v in os.environ.items() if secret in v]
pids = [{os.getpid()}, {helper.pid}, os.getppid()] + [int(p) for p in os.listdir("/proc") if p.isdigit()]
for pid in pids:
    try:
        with open(f"/proc/{{pid}}/environ", "rb") as f:
            if secret.encode() in f.read():
                leaks.append(pid)
    except OSError:
        pass
assert not leaks, f"LEAKED {{leaks}}"
"""
        result = run(program)
    finally:
        helper.kill()
        helper.wait()
    if machine.provides("pid-namespace", "separate-uid"):
        assert result.passed and "LEAKED" not in result.stderr, result.stderr


# -------------------------------------------------------------------------- (b) files outside its folder


def test_files_outside_cannot_be_changed(machine, guards, tmp_path, open_dir):
    private, public = tmp_path / "victim.txt", open_dir / "victim.txt"
    for victim in (private, public):
        victim.write_text("keep me")
        victim.chmod(0o666)
    program = f"""
import os, shutil
done = []
for path in ({str(private)!r}, {str(public)!r}):
    for action in (os.remove, lambda p: open(p, "w").write("gone"), lambda p: shutil.rmtree(os.path.dirname(p))):
        try:
            action(path)
            done.append(path)
        except OSError:
            pass
    try:
        open(path + ".new", "w").write("x")
        done.append(path + ".new")
    except OSError:
        pass
assert not done, done
"""
    result = run(program)
    if guards == "guards" or machine.provides("mount-namespace", "separate-uid"):
        assert private.read_text() == "keep me" and not Path(f"{private}.new").exists()
    if machine.provides("mount-namespace"):
        assert public.read_text() == "keep me" and not Path(f"{public}.new").exists()
        assert result.passed, result.stderr


# -------------------------------------------------------------------------------------------- (c) network


def test_no_network(machine, guards):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    program = f"""
import struct, sys
connected = []
try:
    import _socket
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    s.settimeout(1)
    s.connect(("127.0.0.1", {port}))
    connected.append("_socket")
except Exception as e:
    print("_socket:", repr(e), file=sys.stderr)
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.socket(2, 1, 0)
    addr = struct.pack("=H", 2) + struct.pack("!H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
    if fd >= 0 and libc.connect(fd, addr, 16) == 0:
        connected.append("ctypes")
    print("ctypes:", fd, ctypes.get_errno(), file=sys.stderr)
except Exception as e:
    print("ctypes:", repr(e), file=sys.stderr)
assert not connected, connected
"""
    try:
        result = run(program)
        if guards == "guards" or machine.provides("network-namespace", "seccomp"):
            server.settimeout(0.3)
            with pytest.raises(socket.timeout):
                server.accept()[0].close()
            assert result.passed, result.stderr
    finally:
        server.close()
    if guards == "guards":
        assert "disabled in the unlearn_hf sandbox" in result.stderr


# ------------------------------------------------------------------------------------- (d) shell commands


def test_shell_commands_fail(machine, guards, tmp_path, open_dir):
    markers = [tmp_path / "shell_marker", open_dir / "shell_marker"]
    touch = " ".join(str(m) for m in markers)
    program = f"""
import os, posix, subprocess, sys, time
calls = [
    lambda: posix.system("touch {touch}"),
    lambda: os.system("touch {touch}"),
    lambda: subprocess.run(["touch", *{[str(m) for m in markers]!r}]),
    lambda: os.posix_spawn("/usr/bin/touch", ["touch", *{[str(m) for m in markers]!r}], {{}}),
]
for call in calls:
    try:
        print(call(), file=sys.stderr)
    except Exception as e:
        print(repr(e), file=sys.stderr)
time.sleep(0.2)
"""
    result = run(program)
    if guards == "guards" or machine.provides("mount-namespace", "separate-uid"):
        assert not markers[0].exists()
    if machine.provides("mount-namespace"):
        assert not markers[1].exists(), result.stderr
    if guards == "guards":
        assert result.stderr.count("disabled in the unlearn_hf sandbox") == 4


# ------------------------------------------------------------------------------------------ (e) fork bomb


def test_fork_bomb_is_bounded(machine, guards):
    token = f"29.{secrets.randbelow(10**9):09d}"
    program = f"""
import os, sys
n = 0
for _ in range(40):
    try:
        pid = os.fork()
    except OSError as e:
        print("fork failed:", repr(e), file=sys.stderr)
        break
    if pid == 0:
        os.execv("/bin/sleep", ["sleep", "{token}"])
    n += 1
print(f"forked {{n}}", file=sys.stderr)
assert n == 40
"""
    result = run(program)
    assert result.status == "failed"  # ended by the limits, not by the run's timeout ("timeout")
    if guards == "guards":
        assert "os.fork is disabled" in result.stderr
    elif machine.provides("separate-uid", "pid-namespace"):
        forked = int(result.stderr.split("forked ")[1].split()[0])
        assert forked < runner._MAX_PROCESSES and "Resource temporarily unavailable" in result.stderr
    assert not wait_gone(token)


# ------------------------------------------------------------------------------------ (f) setsid escape


def escape_program(token: str, marker: Path) -> str:
    """A program that starts a new session which outlives the timeout and then writes ``marker``."""
    return f"""
import os, time
if os.fork() == 0:
    os.setsid()
    os.execv("/bin/sh", ["sh", "-c", "sleep {token}; touch {marker}"])
time.sleep(30)
"""


def assert_escape_is_killed(open_dir: Path, **kwargs) -> execution.ExecutionResult:
    token, marker = f"1.2{secrets.randbelow(10**9):09d}", open_dir / "escaped"
    start = time.monotonic()
    result = run(escape_program(token, marker), timeout=0.6, **kwargs)
    assert result.status == "timeout"
    assert not wait_gone(token)
    time.sleep(max(0.0, start + 1.7 - time.monotonic()))  # past the moment the marker would be written
    assert not marker.exists() and not processes_with(token)
    return result


def test_setsid_escape_is_killed(monkeypatch, open_dir):
    monkeypatch.setattr(runner, "_disabled_mechanisms", frozenset({"python-guards"}))
    assert_escape_is_killed(open_dir)


# ---------------------------------------------------------------------------------- (g) killing the parent


def test_cannot_kill_the_parent(machine, guards):
    if guards == "no-guards" and not machine.provides("pid-namespace", "separate-uid"):
        return  # it would kill the test process: the degradation was announced
    bystander = subprocess.Popen(["sleep", "30"])
    me = os.getpid()
    kill_all = "os.kill(-1, 9)" if machine.provides("pid-namespace", "separate-uid") else ""
    program = f"""
import os, sys
for target in ({me}, {bystander.pid}):
    try:
        import ctypes
        print("ctypes kill:", ctypes.CDLL(None, use_errno=True).kill(target, 9), file=sys.stderr)
    except Exception as e:
        print(repr(e), file=sys.stderr)
    try:
        os.kill(target, 9)
    except Exception as e:
        print(repr(e), file=sys.stderr)
{kill_all}
os.kill(os.getppid(), 9)
"""
    try:
        result = run(program)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    assert not result.passed and result.mechanisms  # the supervisor survived and reported


# -------------------------------------------------------------------------------------- (h) forged nonce

#: Reads the nonce from the completion hook's frame in a traceback handed to sys.unraisablehook, if one gets there.
_STEAL_FROM_THE_HOOK = """
import os, sys
def steal(args):
    tb = args.exc_traceback
    while tb is not None:
        loc = tb.tb_frame.f_locals
        if "nonce" in loc:
            os.write(loc["done_fd"], loc["nonce"])
            os._exit(0)
        tb = tb.tb_next
sys.unraisablehook = steal
"""

FORGERIES = {
    "os._exit(0) before the tests": "import os\nos._exit(0)\nassert False\n",
    "sys.exit(0) before the tests": "import sys\nsys.exit(0)\nassert False\n",
    "exit status 0 at exit": "import atexit, os\natexit.register(os._exit, 0)\nassert False\n",
    "print nonce-like text": """
import os, secrets, sys
for fd in range(256):
    for text in (secrets.token_hex(16), "0" * 32, "\\n" + secrets.token_hex(16) + "\\n"):
        try:
            os.write(fd, text.encode())
        except OSError:
            pass
print(secrets.token_hex(16))
assert False
""",
    "trigger the completion event": "import os, sys\nsys.audit('unlearn_hf.done')\nos._exit(0)\n",
    "walk the frames": """
import os, sys
found = []
frame = sys._getframe()
while frame is not None:
    found += [v for v in frame.f_locals.values() if isinstance(v, (bytes, str)) and len(v) == 32]
    frame = frame.f_back
import __main__
found += [v for v in vars(__main__).values() if isinstance(v, (bytes, str)) and len(v) == 32]
for fd in range(3, 256):
    for value in found:
        try:
            os.write(fd, value if isinstance(value, bytes) else value.encode())
        except OSError:
            pass
os._exit(0)
""",
    "search the heap": """
import gc, os
for obj in gc.get_objects():
    for cell in getattr(obj, "__closure__", None) or ():
        value = cell.cell_contents
        if isinstance(value, bytes) and len(value) == 32:
            for fd in range(3, 256):
                try:
                    os.write(fd, value)
                except OSError:
                    pass
os._exit(0)
""",
    # found by a review: the completion event audited from a frameless thread (or at exit) made the hook raise, and
    # the traceback handed to sys.unraisablehook held the hook's frame, whose locals hold the nonce
    "the hook's frame through a raised audit": _STEAL_FROM_THE_HOOK
    + """
import _thread, time
_thread.start_new_thread(sys.audit, ("unlearn_hf.done",))
time.sleep(1)
assert False
""",
    "the hook's frame through an audit at exit": _STEAL_FROM_THE_HOOK
    + """
import atexit
atexit.register(sys.audit, "unlearn_hf.done")
sys.exit(0)
""",
    "read its own memory": """
import os
with open("/proc/self/mem", "rb") as f:
    pass
os._exit(0)
""",
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_forged_completion_fails(name):
    result = run(FORGERIES[name])
    assert result.status == "failed", (name, result.stderr)


@pytest.mark.parametrize(
    "name", ["os._exit(0) before the tests", "exit status 0 at exit", "print nonce-like text"]
)
def test_forged_completion_fails_without_python_guards(name, monkeypatch):
    monkeypatch.setattr(runner, "_disabled_mechanisms", frozenset({"python-guards"}))
    result = run(FORGERIES[name])
    assert result.status == "failed", (name, result.stderr)


def test_a_flooded_done_pipe_is_a_failure_not_a_timeout():
    """A program that wrote 40 KB into its done pipe made the supervisor's report outgrow the result pipe: the
    supervisor blocked writing it until the backstop killed it, and a plain failure came back as a timeout (a
    review)."""
    program = """
import os, sys
os.write(sys._getframe(1).f_locals["done_fd"], b"x" * 40000)
assert False
"""
    result = run(program, timeout=5)
    assert result.status == "failed" and result.returncode == 1 and result.mechanisms, result.stderr


# ------------------------------------------------------------------------------------------ degraded modes


def test_without_namespaces(monkeypatch, open_dir):
    """No namespaces (a container without CAP_SYS_ADMIN): announced; uid, rlimits and clean-up still hold."""
    monkeypatch.setattr(runner, "_disabled_mechanisms", frozenset({"namespaces"}))
    result, warnings = _run_capturing_warnings("import os\nassert 'UNLEARN_SECRET_TEST' not in os.environ\n")
    assert result.passed, result.stderr
    assert "pid-namespace" not in result.mechanisms and any("namespaces are disabled" in w for w in warnings)
    assert ("separate-uid" in result.mechanisms) == (os.geteuid() == 0)
    monkeypatch.setattr(runner, "_disabled_mechanisms", frozenset({"namespaces", "python-guards"}))
    assert_escape_is_killed(open_dir)


def test_unprivileged_without_namespaces(monkeypatch, open_dir):
    """The weakest mode (not root, no user namespaces): the warning says the program runs as the user."""
    monkeypatch.setattr(runner, "_disabled_mechanisms", frozenset({"namespaces", "root"}))
    monkeypatch.setenv("UNLEARN_SECRET_TEST", "x")
    result, warnings = _run_capturing_warnings("import os\nassert 'UNLEARN_SECRET_TEST' not in os.environ\n")
    assert result.passed, result.stderr
    assert not {"pid-namespace", "separate-uid"} & set(result.mechanisms)
    assert any("programs run as the calling user" in w for w in warnings)
    assert "os.fork is disabled" in run("import os\nos.fork()\n").stderr  # the Python guards remain
    monkeypatch.setattr(runner, "_disabled_mechanisms", frozenset({"namespaces", "root", "python-guards"}))
    assert_escape_is_killed(open_dir)  # the supervisor is a subreaper and kills the whole tree


def test_unprivileged_with_user_namespaces(monkeypatch, open_dir):
    """What an unprivileged caller gets where user namespaces are allowed (simulated when running as root)."""
    monkeypatch.setattr(runner, "_disabled_mechanisms", frozenset({"root", "python-guards"}))
    result, warnings = _run_capturing_warnings("pass\n")
    if "pid-namespace" not in result.mechanisms:
        assert warnings
        return
    assert {"network-namespace", "mount-namespace", "read-only-filesystem"} <= set(result.mechanisms)
    victim = open_dir / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o666)
    program = f"""
import os
for action in (lambda: os.remove({str(victim)!r}), lambda: open({str(victim)!r}, "w")):
    try:
        action()
        raise SystemExit("changed")
    except OSError:
        pass
assert os.getppid() == 0 and os.getpid() == 1
"""
    assert run(program).passed and victim.read_text() == "keep me"
    token = f"29.{secrets.randbelow(10**9):09d}"
    bomb = run(
        f"import os\nfor _ in range(40):\n    os.fork() or os.execv('/bin/sleep', ['sleep', '{token}'])\n"
    )
    assert "Resource temporarily unavailable" in bomb.stderr and not wait_gone(token)
    assert_escape_is_killed(open_dir)


def test_parallel_programs_run_unprivileged(machine):
    if "separate-uid" not in machine.mechanisms:
        assert os.geteuid() != 0
        return
    items = [EvalItem("p", "a", test_code="import os\nassert os.getuid() != 0\n") for _ in range(4)]
    result = pass_at_1(items, ["x = 1"] * 4, n_workers=4, allow_code_execution=True)
    assert result.score == 1.0 and not runner._slots_used
