"""Files in run directories, which may come from anyone (a colleague's sweep on a shared file system, a
tarball attached to an issue): written so that a crash or a kill at any instant leaves the old file or the
new one, whole, and so that no symbolic link planted there is followed; read as data, never through a
link, and never without a size bound.

A planted link (`metrics.json -> ~/.bashrc`) would otherwise make the next user's `report`, `train` or
`analyze` write over any file that user can write, or read one into the results it writes beside the runs.
"""

from __future__ import annotations

import errno
import glob
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from resexp.errors import ResexpError

NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
READ_LIMIT = 64 * 2**20  # bytes: far above any config, log or metrics.json resexp writes


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace `path` by what `write` writes: into a temporary file of a fresh name beside it, created
    anew (O_EXCL: never a file or link that was there), flushed to disk, then renamed over `path`, which
    replaces a link planted at `path` instead of writing through it."""
    path = Path(path)
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            # Mode 0o666 less the umask, like any file the user's tools create.
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o666)
            break
        except FileExistsError:  # that name is taken (by anything, a link too): draw another
            continue
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)  # atomic on POSIX: readers see the old file or the new one
        sync_directory(path.parent)
    except BaseException:  # disk full, a signal, anything: leave no temporary file behind
        temporary.unlink(missing_ok=True)
        raise
    # What a write of `path` killed midway (SIGKILL) left: one process writes a run's files (resexp/lock.py)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.{'[0-9a-f]' * 8}.tmp"):
        leftover.unlink(missing_ok=True)  # a name removed, never what a link there points to


def sync_directory(directory: Path) -> None:
    """The renames into `directory` survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh folder inside `out` to write a set of files into (a report's tables and figures, an
    analysis's), whose files replace those of `out` only once every one is written: a full disk, a
    crash or a signal on the way leaves `out` as it was, never half old and half new."""
    out.mkdir(parents=True, exist_ok=True)
    while True:
        stage = out / f".staged.{secrets.token_hex(4)}.tmp"
        try:
            stage.mkdir()  # a fresh folder, never one (or a link) that was there
            break
        except FileExistsError:
            continue
    try:
        yield stage
        for path in sorted(stage.iterdir()):
            os.replace(path, out / path.name)  # a rename needs no space, and replaces a link, never follows it
        sync_directory(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """A descriptor of the regular file at `path` (opened with `flags`), never through a symbolic link,
    never a FIFO or a device (which could block a reader, or never end). OSError otherwise, its strerror
    saying why."""
    fd = os.open(path, flags | NO_FOLLOW | os.O_NONBLOCK, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, limit: int = READ_LIMIT) -> bytes:
    """The bytes of the regular file `path` (open_regular), at most `limit` of them, or OSError: a link
    (ELOOP), a FIFO or device, or a file larger than `limit`."""
    with os.fdopen(open_regular(path), "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data


def read_text(path: Path, limit: int = READ_LIMIT) -> str:
    return read_bytes(path, limit).decode(errors="replace")


def why_not(error: OSError) -> str:
    """An OSError of open_regular or read_bytes in a few words: 'a symbolic link', 'not a regular file'."""
    if error.errno == errno.ELOOP:
        return "a symbolic link, which resexp does not follow"
    if error.errno == errno.ENOENT:
        return "missing"
    return error.strerror or str(error)


def refuse_links(paths: Iterable[Path]) -> None:
    """One line naming the first of `paths` that is a symbolic link: where resexp, or Hydra for it, is
    about to write, a link planted by whoever else can write there would redirect the write."""
    for path in paths:
        if Path(path).is_symlink():
            raise ResexpError(
                f"{path} is a symbolic link (to {os.readlink(path)}); resexp writes there and never through a "
                "link, which anyone who can write into that folder may have planted: remove it, or use another "
                "directory"
            )
