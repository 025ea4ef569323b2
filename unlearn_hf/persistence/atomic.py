"""Replacing a checkpoint folder in one atomic step, so that a save killed at any moment (``SIGKILL``, power loss)
leaves the old checkpoint or the new one, never neither and never a mix.

How a save commits (:func:`replace_folder`):

1. Everything is written into a temporary sibling ``.<name>.unlearn-tmp-<id>`` of the target folder (same file
   system, because same parent). Files of the old folder that are not the previous save's own (a user's notes, a
   README) are carried over as hard links (symbolic links are copied as links, never followed).
2. Every written file and folder is ``fsync``-ed.
3. The temporary folder and the target are swapped by one ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+, ext4, xfs,
   btrfs, tmpfs, ...); a new target is created by one ``rename``. The parent folder is ``fsync``-ed.
4. The temporary folder, which now holds the old checkpoint, is deleted.

Where ``RENAME_EXCHANGE`` is not available (other systems or file systems), step 3 is two renames: the old folder
becomes ``.<name>.unlearn-old-<id>``, then the new one takes its name. A kill between the two leaves no folder
under the target name; :func:`interrupted_swap` finds the old one, loading reads it (with a warning) and the next
save puts it back before it starts.

Saves into the same parent folder are serialized with ``flock`` on the parent (no lock file is created), and every
save first deletes the temporaries that killed saves of the same target left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError

logger = logging.getLogger(__name__)

TMP_MARK = ".unlearn-tmp-"
OLD_MARK = ".unlearn-old-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class AtomicSaveError(OSError):
    """A folder that cannot be replaced atomically (a mount point, a mount inside it, a parent folder this process
    cannot write to), or a save that failed to write (a full disk, a read-only file system). The folder is
    unchanged."""


def check_replaceable(target: Path) -> None:
    """Refuse, before anything is written, the folders a swap cannot replace safely."""
    parent = target.parent
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise AtomicSaveError(
            f"Cannot save {target} atomically: its parent folder {parent} is not writable by this process (the "
            "save is written beside the folder and swapped in). Save into a folder whose parent you can write to."
        )
    if not target.is_dir():
        return
    if not stat.S_IMODE(target.stat().st_mode) & stat.S_IWUSR:  # by its mode bits, even for root
        raise AtomicSaveError(
            f"Cannot save into {target}: the folder is read-only (mode {stat.S_IMODE(target.stat().st_mode):o}). "
            "Make it writable (chmod u+w) to replace it, or save elsewhere."
        )
    if os.path.ismount(target):
        raise AtomicSaveError(
            f"Cannot save into {target}: it is a mount point, which cannot be swapped atomically. Save into a "
            "subfolder of it."
        )
    dev = target.stat().st_dev
    for root, dirs, _files in os.walk(target):
        for d in dirs:
            path = os.path.join(root, d)
            if not os.path.islink(path) and os.stat(path).st_dev != dev:
                raise AtomicSaveError(
                    f"Cannot save into {target}: {path} is another file system mounted inside it, which the save "
                    "would have to copy and delete. Save elsewhere or unmount it."
                )


def resolve_target(path: str | os.PathLike[str]) -> Path:
    """The real folder a save writes to: ``~`` expanded, absolute, symbolic links followed (the temporaries then
    live next to the real folder, on its file system)."""
    given = Path(os.path.abspath(Path(path).expanduser()))
    # links resolved as the file system resolves them, component by component (``link/../x`` is next to the link's
    # target, where the loader, which follows the file system, looks; not ``./x``, as ``abspath`` would have it)
    target = Path(os.path.realpath(Path(path).expanduser()))
    if target != given:
        if target.exists() and not target.is_dir():
            raise NotADirectoryError(f"{given} is a link to {target}, which is not a folder.")
        logger.info("%s resolves to %s; saving there.", given, target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder.")
    return target


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (a no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except PermissionError:  # a parent we may write to but not read: no lock, the swap itself is still atomic
        logger.debug("Cannot lock %s (not readable); saving without the lock.", folder)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def interrupted_swap(target: Path) -> Path | None:
    """The old checkpoint of a two-rename swap killed halfway (only on systems without ``RENAME_EXCHANGE``):
    ``.<name>.unlearn-old-*`` when ``target`` itself does not exist; the newest one if there are several."""
    if target.exists() or not target.parent.is_dir():
        return None
    prefix = f".{target.name}{OLD_MARK}"
    try:
        olds = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except PermissionError:
        return None
    return max(olds, key=lambda p: p.stat().st_mtime_ns) if olds else None


def clean_stale(target: Path) -> None:
    """Put back the old folder of a killed fallback swap and delete the temporaries of killed saves of
    ``target`` (call with the parent locked)."""
    old = interrupted_swap(target)
    if old is not None:
        os.rename(old, target)
        logger.warning("Restored %s from %s, left by a save that was killed.", target, old.name)
    try:
        siblings = list(target.parent.iterdir())
    except PermissionError:
        return
    ours = re.compile(
        rf"^\.{re.escape(target.name)}(?:{re.escape(TMP_MARK)}|{re.escape(OLD_MARK)})[0-9a-f]{{12}}$"
    )
    for p in siblings:
        if ours.match(p.name):
            remove_tree(p)
            logger.info("Removed %s, left by a save that was killed.", p.name)


def new_temporary(target: Path) -> Path:
    tmp = target.parent / f".{target.name}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp)
    return tmp


def remove_tree(path: Path) -> None:
    """Delete ``path`` (a folder: without following any link inside; a file or link: itself)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def carry_over(old: Path, new: Path, skip: Callable[[str], bool]) -> list[str]:
    """Hard-link every file of ``old`` into ``new`` at the same relative path, except those for which
    ``skip(relative posix path)`` is true and those ``new`` already has. Links are recreated, not followed; other
    special files (FIFOs, sockets, devices) are left out with a warning. Returns the carried paths."""
    carried: list[str] = []

    def walk(src: Path, dst: Path, rel: str) -> None:
        with os.scandir(src) as entries:
            for entry in entries:
                r = f"{rel}{entry.name}"
                out = dst / entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    if out.is_symlink() or (out.exists() and not out.is_dir()):
                        continue
                    was_empty = not any(os.scandir(entry.path))
                    out.mkdir(exist_ok=True)
                    walk(Path(entry.path), out, f"{r}/")
                    if not was_empty and not any(out.iterdir()):
                        out.rmdir()  # held only the previous save's files
                    else:
                        copy_mode_and_owner(Path(entry.path), out)
                    continue
                if skip(r) or out.exists() or out.is_symlink():
                    continue
                if stat.S_ISLNK(mode):
                    os.symlink(os.readlink(entry.path), out)
                elif stat.S_ISREG(mode):
                    try:
                        os.link(entry.path, out, follow_symlinks=False)
                    except OSError:
                        shutil.copy2(entry.path, out, follow_symlinks=False)
                else:
                    logger.warning("Not keeping %s: it is not a regular file, folder or link.", entry.path)
                    continue
                carried.append(r)

    walk(old, new, "")
    return carried


def copy_mode_and_owner(src: Path, dst: Path) -> None:
    """Give the folder ``dst`` the permission bits and, where allowed, the owner and group of ``src``."""
    st = src.stat()
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    try:
        os.chown(dst, st.st_uid, st.st_gid)
    except PermissionError:
        pass


def fsync_tree(folder: Path, files: bool = True) -> None:
    """``fsync`` every regular file (with ``files``) and folder under ``folder`` (links are not followed), deepest
    first."""
    for root, _dirs, names in os.walk(folder, topdown=False):
        for name in names if files else ():
            path = os.path.join(root, name)
            if not os.path.islink(path) and os.path.isfile(path):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap the folders ``a`` and ``b`` atomically; ``False`` when this system or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"Cannot swap {a.name} into {b}: {os.strerror(err)}", str(b))


def swap_in(tmp: Path, target: Path) -> Path | None:
    """Make ``tmp`` the folder ``target`` in one step; returns where the old folder now is (``None`` if there was
    none), for the caller to delete."""
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return None
    if exchange(tmp, target):
        fsync_dir(target.parent)
        return tmp
    old = target.parent / f".{target.name}{OLD_MARK}{uuid.uuid4().hex[:12]}"
    logger.debug("RENAME_EXCHANGE is not available here; swapping %s with two renames.", target)
    os.rename(target, old)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    return old


def replace_folder(
    target: Path,
    write: Callable[[Path], list[str]],
    own_old_files: Callable[[Path], set[str]],
) -> list[str]:
    """Atomically replace (or create) the folder ``target`` by what ``write(tmp)`` writes.

    Args:
        target: the folder (already :func:`resolve_target`-ed).
        write: fills the empty temporary folder; returns the relative paths it wrote.
        own_old_files: given the old folder, the relative paths of its files that the previous save wrote (they
            are not carried over).

    Returns:
        The relative paths of the old folder's files that were carried over.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(target)
    with locked(target.parent):
        clean_stale(target)
        tmp, old = new_temporary(target), None
        try:
            carried = _prepare(target, tmp, write, own_old_files)
            cwd = _cwd_inside(target)
            old = swap_in(tmp, target)
            tmp = None
            if cwd is not None:  # the process stood in the replaced folder: move it into the new one
                os.chdir(target / cwd if (target / cwd).is_dir() else target)
        finally:
            if tmp is not None and os.path.lexists(tmp):
                remove_tree(tmp)
        if old is not None:
            try:
                remove_tree(old)
            except OSError as err:  # the new checkpoint is in place: a leftover is cleaned by the next save
                logger.warning("Saved, but could not delete the previous folder %s: %s", old, err)
    return carried


def _prepare(
    target: Path, tmp: Path, write: Callable[[Path], list[str]], own_old_files: Callable[[Path], set[str]]
) -> list[str]:
    """Fill the temporary folder ``tmp`` for :func:`replace_folder`: what ``write`` writes, then the old folder's files
    that are carried over; returns those. An I/O failure (a full disk, a read-only file system) is an
    :class:`AtomicSaveError` that says the folder is unchanged."""
    try:
        written = set(write(tmp))
        fsync_tree(tmp)  # what this save wrote; the carried files below hold old data
        carried: list[str] = []
        if target.is_dir():
            previous = own_old_files(target)
            foreign = sorted(
                r
                for r in written
                if r not in previous and (target / r).exists() and not (target / r).is_dir()
            )
            if foreign:
                logger.warning(
                    "Overwriting %s in %s: files that no earlier unlearn_hf save wrote there (another model's?).",
                    foreign,
                    target,
                )
            carried = carry_over(target, tmp, lambda r: r in previous or r in written)
            copy_mode_and_owner(target, tmp)
            fsync_tree(tmp, files=False)
        return carried
    except AtomicSaveError:
        raise
    except (OSError, SafetensorError) as err:
        raise AtomicSaveError(
            f"Could not write the checkpoint {target} ({err}); the folder is unchanged."
        ) from err


def _cwd_inside(target: Path) -> Path | None:
    """The current directory relative to ``target`` when it is inside it (``None`` otherwise)."""
    try:
        return Path(os.getcwd()).relative_to(target)
    except (ValueError, FileNotFoundError):
        return None
