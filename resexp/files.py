"""Writing result files so that a crash or a kill at any instant leaves the old file or the new one,
whole, never a mix: write a temporary file beside the target, flush it to disk, rename it over."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")  # one name, so a write killed midway is simply redone
    try:
        # Mode 0o666 less the umask, like any file the user's tools create.
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)  # atomic on POSIX: readers see the old file or the new one
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # and the rename itself survives a power cut
        finally:
            os.close(directory)
    except BaseException:  # disk full, a signal, anything: leave no temporary file behind
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))
