"""Checkpoints: a plain dict of tensors and numbers, replaced atomically, read as data only (never code)."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from resexp.errors import ResexpError
from resexp.files import atomic_write

VERSION = 2  # bump when the layout of the dict changes; older files are then refused with a message, or read as below


def save(path: Path, state: dict[str, Any]) -> None:
    """Replace `path` atomically: a kill at any instant leaves the previous checkpoint, whole."""
    try:
        atomic_write(path, lambda file: torch.save({**state, "version": VERSION}, file))
    # Disk full, quota, read-only: the old checkpoint is untouched. torch.save reports a failed write of
    # its zip archive as a RuntimeError ("PytorchStreamWriter failed writing file ..."), not an OSError.
    except (OSError, RuntimeError) as error:
        kept = f"the previous checkpoint {path} is intact" if Path(path).exists() else "no checkpoint was kept"
        reason = getattr(error, "strerror", None) or f"{str(error).strip().splitlines()[0]}; is the disk full?"
        raise ResexpError(
            f"could not write the checkpoint {path} ({reason}); {kept}; once it can be written, the same command resumes"
        ) from None


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`: tensors, numbers, strings and containers only, so a
    crafted file cannot run code. Anything unreadable is a one-line error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickle protocols: the verdict follows anyway
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ResexpError(
            f"{path} is not a readable resexp checkpoint (it holds objects other than tensors and numbers, "
            "and resexp loads checkpoints as data only, never as code); move it away to start this run over"
        ) from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError, KeyError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ResexpError(
            f"{path} is not a readable resexp checkpoint ({first_line}); move it away to start this run over"
        ) from None
    if isinstance(state, dict) and state.get("version") == 1 and "experiment" in state:
        state["identity"] = state.pop("experiment")  # version 1's name for it; nothing else changed
        state["version"] = VERSION
    if not isinstance(state, dict) or state.get("version") != VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ResexpError(f"{path} is a checkpoint of version {found!r}; this resexp reads versions 1 to {VERSION}")
    return state


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: value there, value now` for each setting in which a checkpoint's record and the current
    settings disagree."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{key}: {saved.get(key)!r} there, {current.get(key)!r} now"
        for key in keys
        if saved.get(key) != current.get(key)
    ]


def check_same_run(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A checkpoint continues only the run that wrote it: the same net, shortcut, data and recipe (the
    identities: a run's settings but where and how it runs)."""
    if found := differences(saved, current):
        raise ResexpError(
            f"{path} belongs to another experiment ({'; '.join(found)}); "
            "use the same settings to resume it, or another hydra.run.dir to start a new run"
        )
