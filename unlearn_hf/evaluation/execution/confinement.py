"""The operating-system side of the sandbox: namespaces, mounts, identity, resource limits, seccomp.

Loaded by path by ``supervisor.py`` (which runs under ``python -I``); standard library only, it never imports
unlearn_hf. Everything here goes through ``ctypes`` and raises :class:`OSError` where the kernel refuses.
"""

import ctypes
import os
import pwd
import resource
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
# fmt: off
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
# fmt: on
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 442, -100, 0x8000, 1, 2
HIDDEN = ("/home", "/root", "/tmp", "/var/tmp", "/run", "/dev/shm", "/mnt", "/media", "/srv")
LIBC = ctypes.CDLL(None, use_errno=True)
IS_LINUX = sys.platform.startswith("linux")


class MountAttr(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def check(ret, what):
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def prctl(option, value):
    if not IS_LINUX:
        return 0
    return check(
        LIBC.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(value),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        ),
        "prctl",
    )


def mount(source, target, fstype, flags, data=None):
    enc = [None if x is None else os.fsencode(x) for x in (source, target, fstype, data)]
    check(
        LIBC.mount(
            ctypes.c_char_p(enc[0]),
            ctypes.c_char_p(enc[1]),
            ctypes.c_char_p(enc[2]),
            ctypes.c_ulong(flags),
            ctypes.c_char_p(enc[3]),
        ),
        f"mount {target}",
    )


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def become(uid):
    """Switch all user and group ids to ``uid`` (as root), with no supplementary groups."""
    os.setgroups([])
    if hasattr(os, "setresuid"):
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    else:
        os.setgid(uid)
        os.setuid(uid)


def count_processes(uid):
    n = 0
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        try:
            n += name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
        except OSError:
            pass
    return n


def blocked_at(path, uid, gid):
    """The first directory on the way to ``path`` that ``uid`` cannot enter (``path`` itself: read too)."""
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        try:
            st = os.stat(d)
        except OSError:
            return None
        bits = st.st_mode >> 6 if st.st_uid == uid else st.st_mode >> 3 if st.st_gid == gid else st.st_mode
        need = 5 if i == len(parts) else 1
        if bits & need != need:
            return d
    return None


def hide(d, needed):
    """Mount an empty tmpfs on ``d``, keeping the entries of ``d`` that lead to a ``needed`` path."""
    if any(p == d or d.startswith(p + "/") for p in needed):
        return
    keep = sorted({p[len(d) + 1 :].split("/")[0] for p in needed if p.startswith(d + "/")})
    fds = {c: os.open(os.path.join(d, c), os.O_PATH | os.O_NOFOLLOW) for c in keep}
    try:
        mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
        for c, fd in fds.items():
            target = os.path.join(d, c)
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
    finally:
        for fd in fds.values():
            os.close(fd)


def read_only(notes):
    attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    ret = LIBC.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(b"/"),
        ctypes.c_uint(AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if ret == 0:
        return True
    names = {
        "ro": MS_RDONLY,
        "nosuid": MS_NOSUID,
        "nodev": MS_NODEV,
        "noexec": MS_NOEXEC,
        "noatime": MS_NOATIME,
        "nodiratime": MS_NODIRATIME,
        "relatime": MS_RELATIME,
    }
    failed = []
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        fields = line.split()
        target = fields[4].encode().decode("unicode_escape")
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID
        for opt in fields[5].split(","):
            flags |= names.get(opt, 0)
        try:
            mount(None, target, None, flags)
        except OSError:
            failed.append(target)
    if failed:
        notes.append("these mounts stay writable where permissions allow: " + ", ".join(failed[:5]))
    return not failed


def set_up_mounts(cfg, drop_uid, on, notes):
    """A private mount namespace: fresh /proc, host directories hidden, read-only, a tmpfs work dir."""
    try:
        check(LIBC.unshare(ctypes.c_int(CLONE_NEWNS)), "unshare")
        mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as e:
        notes.append(f"no mount namespace ({e}): the file system is as writable as for the user")
        return
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as e:
        notes.append(f"/proc could not be remounted ({e}): it lists the host's processes")
    python = {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    needed = python | {os.path.realpath(cfg["tmp"])}
    try:
        homes = {pwd.getpwuid(os.getuid()).pw_dir} if drop_uid is None else set()
    except KeyError:
        homes = set()
    for d in sorted({os.path.realpath(h) for h in (*HIDDEN, *homes)}, key=len):
        if d != "/" and os.path.isdir(d):
            try:
                hide(d, needed)
            except OSError as e:
                notes.append(f"{d} stays visible ({e})")
    if drop_uid is not None:
        for _ in range(16):
            blocked = {b for b in (blocked_at(p, drop_uid, drop_uid) for p in python) if b}
            if not blocked or blocked & python:
                break
            try:
                hide(min(blocked, key=len), needed)
            except OSError:
                break
    if read_only(notes):
        on.append("read-only-filesystem")
    uid, gid = (os.getuid(), os.getgid()) if drop_uid is None else (drop_uid, drop_uid)
    size = max(1, 2 * cfg["fsize"] // 2**20)
    try:
        mount(
            "tmpfs",
            cfg["work"],
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            f"size={size}m,nr_inodes=4096,mode=700,uid={uid},gid={gid}",
        )
    except OSError as e:
        notes.append(f"the work directory is not a private tmpfs ({e})")
    on.append("mount-namespace")


def set_limits(cfg, nproc, on):
    limits = (
        (resource.RLIMIT_AS, cfg["memory"]),
        (resource.RLIMIT_CPU, cfg["cpu"]),
        (resource.RLIMIT_FSIZE, cfg["fsize"]),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, nproc),
    )
    for res, value in limits:
        _, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))
    on.append("rlimits")


# fmt: off
SECCOMP_DENIED = {  # namespaces, mounts, tracing, kernel interfaces; socket(): only AF_UNIX; clone(): no CLONE_NEW*
    "x86_64": dict(arch=0xC000003E, clone=56, socket=41, deny=(
        272, 308, 165, 166, 155, 161, 101, 310, 311, 312, 321, 298, 250, 248, 249, 323, 246, 320, 175, 313, 176,
        163, 167, 168, 169, 134)),
    "aarch64": dict(arch=0xC00000B7, clone=220, socket=198, deny=(
        97, 268, 40, 39, 41, 51, 117, 270, 271, 272, 280, 241, 219, 217, 218, 282, 104, 294, 105, 273, 106,
        89, 224, 225, 142)),
}
SECCOMP_COMMON = (425, 426, 427, 428, 429, 430, 431, 432, 433, 434, 438, 442)  # io_uring, new mount API, pidfd
# fmt: on


def install_seccomp():
    """A seccomp filter refusing (EPERM) the system calls a program has no use for; False if unsupported."""
    table = SECCOMP_DENIED.get(os.uname().machine)
    if table is None:
        return False

    def op(code, k, jt=0, jf=0):
        return (code, jt, jf, k)

    def ld(offset):
        return op(0x20, offset)

    def jeq(k, jt, jf):
        return op(0x15, k, jt, jf)

    def ret(k):
        return op(0x06, k)

    eperm, enosys, allow = 0x00050000 | 1, 0x00050000 | 38, 0x7FFF0000
    prog = [ld(4), jeq(table["arch"], 1, 0), ret(eperm), ld(0), op(0x35, 0x40000000, 0, 1), ret(eperm)]
    for nr in (*table["deny"], *SECCOMP_COMMON):
        prog += [jeq(nr, 0, 1), ret(eperm)]
    prog += [jeq(435, 0, 1), ret(enosys)]  # clone3: its flags are out of reach; libc falls back to clone
    prog += [jeq(table["clone"], 0, 4), ld(16), op(0x45, 0x7E020000, 0, 1), ret(eperm), ret(allow)]
    prog += [jeq(table["socket"], 0, 3), ld(16), jeq(1, 1, 0), ret(eperm), ret(allow)]

    class Filter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*i) for i in prog])
    fprog = Program(len(prog), filters)
    check(
        LIBC.prctl(
            ctypes.c_int(22), ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)
        ),
        "seccomp",
    )
    return True


def drop_capabilities():
    header = CapHeader(0x20080522, 0)
    data = (CapData * 2)()
    check(LIBC.capset(ctypes.byref(header), ctypes.byref(data)), "capset")


def enter_namespaces(drop_uid):
    """Unshare PID, network, IPC and UTS namespaces; inside a new user namespace unless root hands the program
    to ``drop_uid``."""
    flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    check(LIBC.unshare(ctypes.c_int(flags | (CLONE_NEWUSER if drop_uid is None else 0))), "unshare")
    if drop_uid is None:
        write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        write_file("/proc/self/gid_map", f"{gid} {gid} 1")
