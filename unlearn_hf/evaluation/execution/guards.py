"""The sandbox's in-process part: the audit hook that reports completion with the nonce, the Python-level
guards (defence in depth, not a boundary) and the run of the candidate's code.

Loaded by path by ``supervisor.py`` (which runs under ``python -I``); standard library only, it never imports
unlearn_hf.
"""

import _signal
import os
import signal
import sys
import traceback

try:
    import _posixsubprocess
except ImportError:
    _posixsubprocess = None


def done_hook(nonce_fd, done_fd, guard_frame):
    """The audit hook that reports completion; the only holder of the nonce."""
    nonce = os.read(nonce_fd, 64)
    os.close(nonce_fd)
    write, getframe, state = os.write, sys._getframe, [False]

    def hook(event, args):
        # nothing may leave this frame: an exception escaping it (getframe(1) raises when a frameless thread
        # audits the event) carries a traceback whose frame holds the nonce (sys.unraisablehook read it)
        try:
            if event == "unlearn_hf.done" and not state[0]:
                state[0] = True
                if getframe(1) is guard_frame:
                    write(done_fd, nonce)
        except BaseException:  # noqa: BLE001, S110 - not even a KeyboardInterrupt: no report is the outcome
            pass

    return hook


def install_guards(work):
    """Python-level defence in depth: an audit hook refusing process, network, native and introspection calls."""
    msg = "is disabled in the unlearn_hf sandbox"
    # fmt: off
    blocked = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__", "socket.connect", "socket.bind",
        "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname", "sys.settrace", "sys.setprofile",
        "sys._current_frames", "sys.monitoring.register_callback", "gc.get_objects", "gc.get_referrers",
        "gc.get_referents",
    ))
    modules = frozenset(("ctypes", "_ctypes", "cffi", "_cffi_backend", "_xxsubinterpreters",
                         "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase"))
    file_events = frozenset(("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.symlink", "os.link",
                             "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.rmtree"))
    # fmt: on
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    abspath, fsdecode, root = os.path.abspath, os.fsdecode, work.rstrip("/") + "/"
    devices = frozenset(("/dev/null", "/dev/stdout", "/dev/stderr"))

    def guard(event, args):
        def outside(path):
            if isinstance(path, (str, bytes)):
                path = abspath(fsdecode(path))
                return not (path + "/").startswith(root) and path not in devices
            return False

        if event in blocked or event.startswith("ctypes."):
            raise PermissionError(f"{event} {msg}")
        if event == "import" and args[0].partition(".")[0] in modules:
            raise ImportError(f"importing {args[0]} {msg}")
        if event == "sys.addaudithook":
            raise RuntimeError(f"{event} {msg}")
        if event == "open":
            path, mode, flags = args
            if isinstance(path, (str, bytes)) and fsdecode(path).endswith("/mem"):
                raise PermissionError(f"opening {fsdecode(path)} {msg}")
            if (any(c in (mode or "") for c in "wax+") or flags & write_flags) and outside(path):
                raise PermissionError(f"writing {fsdecode(path)} {msg}")
        if event in file_events and outside(args[0]):
            raise PermissionError(f"{event} outside the working directory {msg}")
        if event == "os.rename" and outside(args[1]):
            raise PermissionError(f"{event} outside the working directory {msg}")

    def no_signals(*args, **kwargs):
        raise PermissionError(f"installing signal handlers {msg}")

    def no_processes(*args, **kwargs):
        raise PermissionError(f"process creation {msg}")

    sys.addaudithook(guard)
    signal.signal = _signal.signal = no_signals
    if _posixsubprocess is not None:
        _posixsubprocess.fork_exec = no_processes


def execute(code, glb, nonce_fd, done_fd, guards, work):
    """Run the candidate; report completion (through the audit hook) only when its code ran to its end."""
    audit, exit_, stdout, stderr = sys.audit, os._exit, sys.stdout, sys.stderr
    print_exception = traceback.print_exception
    sys.addaudithook(done_hook(nonce_fd, done_fd, sys._getframe()))
    if guards:
        install_guards(work)
    status = 0
    try:
        exec(code, glb)
        audit("unlearn_hf.done")
    except SystemExit:
        raise
    except BaseException as e:
        print_exception(type(e), e, e.__traceback__.tb_next)
        status = 1
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except Exception:
            pass
    exit_(status)
