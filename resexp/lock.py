"""One process per run directory: an advisory lock, held for the life of the process that trains there.

Two processes on one directory (a resubmitted cluster job, a second terminal) would each resume the
same checkpoint and write over each other's. So the process that trains a run first holds the lock of
its directory, `LOCK` (flock(2), which NFS emulates with its own locks), and writes into the lock file
who it is, its PID and host, for a second process to name in its refusal. The kernel lets go of a lock
when its process ends, however it ends: a lock file left by a process killed with SIGKILL blocks
nothing, and the next process takes it over. A process that ends normally removes the file.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from resexp.errors import ResexpError
from resexp.files import open_regular, why_not
from resexp.runs import LOCK

HELD: dict[Path, int] = {}  # directory -> the open lock file this process holds the lock of


def hold(directory: Path) -> None:
    """Hold the lock of `directory` (made if missing) until `release`, or refuse with one line naming
    the process that holds it. Holding it again is nothing new. Where no lock file can be made (a
    read-only or missing folder) nothing is held: what writes there next reports that folder."""
    directory = directory.absolute()
    if directory in HELD:
        return
    path = directory / LOCK
    while True:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            return
        try:
            fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        except OSError as error:
            if path.is_symlink() or path.exists():  # planted: a link, a FIFO, a folder
                raise ResexpError(f"{path} is {why_not(error)}; remove it, or use another directory") from None
            return
        if os.fstat(fd).st_nlink != 1:  # a hard link to some other file: truncating it would truncate that
            os.close(fd)
            raise ResexpError(f"{path} is a hard link to another file; remove it, or use another directory")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ResexpError(
                f"{directory} is in use by {holder}; wait for it to end, or stop it (it saves a checkpoint) "
                "and run the command again"
            ) from None
        # Its last holder may have removed the file between our open and our lock: then lock the new one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(
        fd, f"process {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode()
    )
    HELD[directory] = fd


def release(directory: Path | None = None) -> None:
    """Let go of the lock of `directory` (None: of every directory) that this process holds, removing
    the lock file while it is still this process's own."""
    held = list(HELD) if directory is None else [directory.absolute()]
    for name in held:
        fd = HELD.pop(name, None)
        if fd is None:
            continue
        path = name / LOCK
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()  # while still locked: no other process can be holding this file
        except FileNotFoundError:  # taken back with its directory
            pass
        os.close(fd)
