"""Outputs written safely: the rules every command's OUT obeys, locks, and atomic files and folders.

Everything is built in a temporary sibling of OUT and renamed into place at the end, so an error or Ctrl-C never
leaves a half-written OUT. Before any work, ``check_out`` refuses an OUT that would destroy or alter an input (OUT
equal to, inside, or containing a source, model or data path), the current folder, or a folder whose parent cannot
be written. ``out_lock`` holds an exclusive lock (``.OUT.lock`` beside OUT, removed on exit) for the whole command,
so two runs into one OUT cannot race; it also clears temporary siblings left by a run that was killed.
"""

import contextlib
import errno
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import MLAError

_HELD: set[Path] = set()  # lock files this process holds: the lock is re-entrant within one process


def nearly_full(folder: Path) -> bool:
    """Less than 1 MiB left for us on ``folder``'s file system: what a failed write there most likely ran into."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 2**20


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary sibling path of the output file ``path``; on success rename it into place with the mode the
    umask implies, on any failure (an error, a signal, a full disk) remove it: ``path`` is whole or untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise MLAError(f"cannot write {path}: {err.strerror or err}") from None
        raise


def write_text(path, text: str) -> None:
    """Write an output file (``--json``) whole or not at all (see ``atomic_file``)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _overlap(out: Path, inputs: list[Path], what: str) -> None:
    for inp in inputs:
        if out == inp:
            raise MLAError(f"{what} {out} is an input of this command: refusing to replace it")
        if inp.is_relative_to(out):
            raise MLAError(f"{what} {out} contains the input {inp}: refusing to replace it")
        if out.is_relative_to(inp):
            raise MLAError(f"{what} {out} lies inside the input {inp}: write it somewhere else")
    cwd = Path.cwd().resolve()
    if cwd.is_relative_to(out):
        raise MLAError(f"{what} {out} is the current folder or contains it: give a new folder")
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        return
    if home.is_relative_to(out):
        raise MLAError(f"{what} {out} contains your home folder: give a new folder")


def check_writable(folder: Path, what: str) -> None:
    """MLAError unless a file can be created in ``folder`` (checked by creating one: root ignores permission bits)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".mla-write-test-", dir=folder)
    except OSError as err:
        raise MLAError(f"cannot write {what} in {folder}: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)


def check_out(out: Path, overwrite: bool, inputs=(), what: str = "OUT", make_parent: bool = False) -> Path:
    """Refuse before any work an OUT that is a file, is non-empty without ``overwrite``, would replace or alter one
    of ``inputs`` (resolved local paths), is the current folder, or whose parent is missing or not writable."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise MLAError(f"{what} {out} exists and is not a folder")
    _overlap(out, list(inputs), what)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MLAError(f"{what} {out} exists and is not empty (use --overwrite to replace it)")
    parent = out.parent
    while make_parent and not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MLAError(f"the parent folder of {what} does not exist: {out.parent}")
    check_writable(parent, what)
    return out


def check_out_file(path, inputs=(), what: str = "--json") -> Path:
    """The same rules for an output file (``--json``): not an input or inside one, not a folder, writable parent."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise MLAError(f"{what} {path} is a folder, not a file")
    for inp in inputs:
        if path == inp or path.is_relative_to(inp):
            raise MLAError(f"{what} {path} is or lies inside the input {inp}: write it somewhere else")
    if not path.parent.is_dir():
        raise MLAError(f"the folder of {what} does not exist: {path.parent}")
    check_writable(path.parent, what)
    return path


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def out_lock(out: Path, what: str = "OUT", wait: bool = False, make_parent: bool = False):
    """Hold an exclusive lock on OUT for the body (re-entrant); MLAError if another process holds it (or, with
    ``wait``, wait for it: for shared cache folders).

    The lock is ``flock`` on ``.OUT.lock`` beside OUT: the kernel releases it when the process dies, even by SIGKILL,
    and the file is removed on a normal exit. Once held, temporary siblings of OUT whose process is gone are removed.
    """
    out = Path(out).expanduser().resolve()
    path = _lock_path(out)
    created = []  # missing parents made for the lock (removed again on exit when empty)
    if make_parent:
        for parent in reversed(out.parents):
            if not parent.exists():
                with contextlib.suppress(OSError):
                    parent.mkdir()
                    created.append(parent)
    if path in _HELD:
        yield out
        return
    try:
        fd = _acquire(path, out, what, wait)
    except BaseException:
        _remove_empty(created)
        raise
    _HELD.add(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for another run's error (fails on a full disk)
        clear_stale(out)
        yield out
    finally:
        _HELD.discard(path)
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _acquire(path: Path, out: Path, what: str, wait: bool) -> int:
    """An fd holding ``flock`` on the lock file ``path`` (the file that is there once locked)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise MLAError(f"cannot write {what} in {out.parent}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MLAError(f"cannot lock {what} {out}: {err.strerror or err}") from None
            owner = path.read_text().strip() if path.exists() else "?"
            raise MLAError(f"{what} {out} is being written by another mla process (pid {owner or '?'}); wait for it "
                           "to finish or choose another folder") from None
        try:  # the holder before us may have removed the file after we opened it: lock the file that is there
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


_TEMP = re.compile(r"\.(tmp|old)-(\d+)(-.*)?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    return True


def clear_stale(out: Path) -> list[Path]:
    """Remove ``.OUT.tmp-PID-*`` / ``.OUT.old-PID`` siblings whose process PID no longer runs; return them."""
    removed = []
    prefix = f".{out.name}"
    if not out.parent.is_dir():
        return removed
    for item in out.parent.iterdir():
        if not item.name.startswith(prefix):
            continue
        m = _TEMP.fullmatch(item.name[len(prefix):])
        if m and int(m.group(2)) != os.getpid() and not _alive(int(m.group(2))):
            shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)
            removed.append(item)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(folder: Path) -> None:
    """Give every file and folder under ``folder`` the mode the umask implies: libraries write some files 0600
    (safetensors' ``save_file``), everything else follows the umask, and one export should not mix the two."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool, make_parent: bool = False):
    """Yield a temporary sibling folder; on success replace ``out`` with it, on any error remove it.

    The folder gets the mode the user's umask implies (not ``mkdtemp``'s 0700). OUT is locked (re-entrant: commands
    hold the lock from their start) and checked again just before the rename.
    """
    out = check_out(out, overwrite, make_parent=make_parent)
    with out_lock(out, make_parent=make_parent):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            yield tmp
            _follow_umask(tmp)
            if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
                raise MLAError(f"OUT {out} was written by someone else while this command ran; not replaced")
            old = None
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                os.replace(out, old)
            os.replace(tmp, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise




def write_error(err: OSError, folder: Path) -> MLAError:
    if err.errno == errno.ENOSPC:
        return MLAError(f"no space left on the device while writing into {folder.parent}: free some space and run "
                        "again (nothing was left behind)")
    return MLAError(f"cannot write into {folder}: {err.strerror or err}")
