"""The sandbox supervisor, run as ``python -I supervisor.py <config JSON>`` by ``runner.run_program``.

main() unshares the namespaces and forks child(), the program's process, which sets up mounts, limits and
identity, then runs the candidate; main() itself only waits (up to the timeout), kills what is left and writes a
JSON report to the caller's pipe. Standard library only; it never imports unlearn_hf. Its helpers,
``confinement.py`` (the operating-system mechanisms) and ``guards.py`` (the in-process part), are loaded by path
from this file's folder: ``python -I`` leaves that folder off ``sys.path``, and putting it there would let the
program import them (and keep the folder visible in its mount namespace).
"""

import json
import os
import re
import select
import signal
import sys
import time
import traceback


def load(name):
    """The sibling file ``<name>.py`` as a module, by path, not registered in ``sys.modules``."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    module = type(sys)(name)
    module.__file__ = path
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), module.__dict__)
    return module


def child(cfg, namespaces, drop_uid, nonce_fd, done_fd, setup_fd):
    """The program's process (PID 1 of its PID namespace when there is one)."""
    on, notes = ["session", "scrubbed-environment"], []
    if namespaces:
        on += ["pid-namespace", "network-namespace", "ipc-namespace"]
        os.setsid()
        confinement.set_up_mounts(cfg, drop_uid, on, notes)
    release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    if drop_uid is not None or (namespaces and release >= (5, 14)):
        nproc = cfg["nproc"]
    else:
        nproc = confinement.count_processes(os.getuid()) + cfg["nproc"]
        notes.append("the process limit counts all of the user's processes")
    confinement.set_limits(cfg, nproc, on)
    if drop_uid is not None:
        python = {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
        blocked = {b for b in (confinement.blocked_at(p, drop_uid, drop_uid) for p in python) if b}
        if blocked:
            notes.append(
                f"the sandbox user cannot read {', '.join(sorted(blocked))}: modules not imported yet "
                "may fail to import"
            )
        confinement.become(drop_uid)
        on.append("separate-uid")
    if confinement.IS_LINUX:
        confinement.drop_capabilities()
    confinement.prctl(confinement.PR_SET_NO_NEW_PRIVS, 1)
    confinement.prctl(confinement.PR_SET_DUMPABLE, 0)
    confinement.prctl(confinement.PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        if confinement.install_seccomp():
            on.append("seccomp")
        else:
            notes.append(f"no seccomp filter for {os.uname().machine}")
    except OSError as e:
        notes.append(f"no seccomp filter ({e})")
    if cfg["guards"]:
        on.append("python-guards")
    os.write(setup_fd, json.dumps({"on": on, "notes": notes}).encode())
    os.close(setup_fd)
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    os.chdir(cfg["work"])
    sys.dont_write_bytecode = True
    main = type(sys)("__main__")
    main.__file__ = cfg["program"]
    sys.modules["__main__"] = main
    sys.argv = [cfg["program"]]
    for name in [n for n in sys.modules if n.partition(".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]
    try:
        code = compile(source, cfg["program"], "exec")
    except (SyntaxError, ValueError) as e:
        traceback.print_exception(type(e), e, None)
        sys.stderr.flush()
        os._exit(1)
    guards.execute(code, main.__dict__, nonce_fd, done_fd, cfg["guards"], cfg["work"])


def kill_uid(uid):
    """Kill every process of ``uid`` (a helper that becomes ``uid`` and signals -1)."""
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                confinement.become(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_tree():
    """Kill our session and every descendant (orphans are re-parented to us: we are a subreaper)."""
    me, sid = os.getpid(), os.getsid(0)
    for _ in range(100 if os.path.isdir("/proc") else 0):
        table = {}
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
            except (OSError, ValueError):
                continue
            fields = data[data.rindex(b")") + 2 :].split()
            table[int(name)] = (fields[0], int(fields[1]), int(fields[3]))
        victims = []
        for pid, (state, ppid, session) in table.items():
            if pid == me or state == b"Z":
                continue
            chain, p = set(), ppid
            while p > 1 and p != me and p not in chain:
                chain.add(p)
                p = table.get(p, (b"", 0, 0))[1]
            if session == sid or p == me:
                victims.append(pid)
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)
        reap()


def read_all(fd, limit=65536):
    """At most ``limit`` bytes of what the pipe ``fd`` holds (the report must fit the result pipe: a program that
    floods its done pipe must not make the supervisor block writing it)."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < limit:
        try:
            chunk = os.read(fd, limit - size)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    os.close(fd)
    return b"".join(chunks)


def supervise(cfg, pid, start, namespaces, drop_uid, done_r, setup_r, notes):
    deadline = start + cfg["timeout"]
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    timed_out = False
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid == pid:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        if pidfd is not None:
            select.select([pidfd], [], [], remaining)
        else:
            time.sleep(min(remaining, 0.005))
    if not namespaces:
        if drop_uid is not None:
            kill_uid(drop_uid)
        kill_tree()
    reap()
    try:
        setup = json.loads(read_all(setup_r) or b"{}")
    except ValueError:
        setup = {}
    return {
        "returncode": os.waitstatus_to_exitcode(status),
        "timed_out": timed_out,
        "done": read_all(done_r, 64).hex(),  # the nonce is 32 bytes: more is not it
        "on": setup.get("on", []),
        "notes": notes + setup.get("notes", []),
    }


def main():
    cfg = json.loads(sys.argv[1])
    disabled = set(cfg["disabled"])
    notes = []
    drop_uid = cfg["uid"] if os.geteuid() == 0 else None
    if drop_uid is not None and "root" in disabled:
        confinement.become(drop_uid)
        confinement.prctl(confinement.PR_SET_DUMPABLE, 1)
        drop_uid = None
    confinement.prctl(confinement.PR_SET_CHILD_SUBREAPER, 1)
    namespaces = False
    if "namespaces" in disabled:
        notes.append("namespaces are disabled")
    elif not confinement.IS_LINUX:
        notes.append(f"no namespaces on {sys.platform}")
    else:
        try:
            confinement.enter_namespaces(drop_uid)
            namespaces = True
        except OSError as e:
            notes.append(f"no user/PID/network namespaces ({e})")
    if drop_uid is None and not namespaces:
        notes.append(
            "programs run as the calling user, without namespaces: they can read that user's files "
            "and the environments of that user's processes, write wherever that user can and signal "
            "that user's processes; only the rlimits, the seccomp filter (no network, no tracing) and "
            "the Python-level guards stand in their way"
        )
    nonce_fd, result_fd = cfg["nonce_fd"], cfg["result_fd"]
    setup_r, setup_w = os.pipe()
    done_r, done_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(result_fd)
        os.close(setup_r)
        os.close(done_r)
        child(cfg, namespaces, drop_uid, nonce_fd, done_w, setup_w)
        os._exit(70)
    confinement.prctl(confinement.PR_SET_DUMPABLE, 0)
    os.close(nonce_fd)
    os.close(setup_w)
    os.close(done_w)
    report = supervise(cfg, pid, start, namespaces, drop_uid, done_r, setup_r, notes)
    os.write(result_fd, json.dumps(report).encode())
    os.close(result_fd)


if __name__ == "__main__":
    confinement, guards = load("confinement"), load("guards")
    main()
