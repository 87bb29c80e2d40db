"""Checkpoints: a plain dict of tensors and numbers, replaced atomically, read as data only (never code)."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from resexp import models
from resexp.errors import ResexpError, first_line
from resexp.files import atomic_write, open_regular, why_not

START_OVER = "move it away to start this run over"  # what a damaged or foreign checkpoint leaves to do
VERSION = 2  # bump when the layout of the dict changes; older files are then refused with a message, or read as below


def save(path: Path, state: dict[str, Any]) -> None:
    """Replace `path` atomically: a kill at any instant leaves the previous checkpoint, whole."""
    try:
        atomic_write(path, lambda file: torch.save({**state, "version": VERSION}, file))
    # Disk full, quota, read-only: the old checkpoint is untouched. torch.save reports a failed write of
    # its zip archive as a RuntimeError ("PytorchStreamWriter failed writing file ..."), not an OSError.
    except (OSError, RuntimeError) as error:
        kept = f"the previous checkpoint {path} is intact" if Path(path).exists() else "no checkpoint was kept"
        reason = getattr(error, "strerror", None) or f"{first_line(error)}; is the disk full?"
        raise ResexpError(
            f"could not write the checkpoint {path} ({reason}); {kept}; once it can be written, the same command resumes"
        ) from None


# What a checkpoint holds (the training loop writes it: resexp/train.py), and the type of each part:
# a file without one of them, or with one of another type, is damaged.
LAYOUT: dict[str, type] = {
    "identity": dict,  # the run's settings less NOT_IDENTITY, for a resume to match
    "model": dict,  # the net's state_dict
    "optimizer": dict,  # the optimizer's state_dict
    "data": dict,  # the training stream's position and generator
    "rng": dict,  # torch's RNG states
    "progress": dict,  # the loop's state (train.Progress)
    "totals": torch.Tensor,  # the loss and error sums since the last log point
}


def load(path: Path, layout: dict[str, type] = LAYOUT) -> dict[str, Any]:
    """Read a checkpoint as data only, checked whole: every record of the file against the CRC-32 that
    torch.save stores beside it in its zip archive (torch.load itself reads a flipped byte without a
    word), then `torch.load(weights_only=True)`, which admits tensors, numbers, strings and containers
    only, so a crafted file cannot run code, then the parts of `layout`. Anything else is one line."""
    try:
        file = os.fdopen(open_regular(path), "rb")  # never through a link, never a FIFO (resexp/files.py)
    except OSError as error:
        raise ResexpError(f"{path} is {why_not(error)}; {START_OVER}") from None
    with file:
        state = read_archive(path, file)
    if isinstance(state, dict) and state.get("version") == 1:
        if "experiment" in state:
            state["identity"] = state.pop("experiment")  # version 1's name for it; nothing else changed
        state["version"] = VERSION
    if not isinstance(state, dict) or state.get("version") != VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ResexpError(f"{path} is a checkpoint of version {found!r}; this resexp reads versions 1 to {VERSION}")
    for key, kind in layout.items():
        if not isinstance(state.get(key), kind):
            what = "no" if key not in state else f"a {type(state[key]).__name__} as its"
            raise ResexpError(f"{path} is not a whole resexp checkpoint: it has {what} {key!r}; {START_OVER}")
    if "progress" in layout:
        iteration = state["progress"].get("iteration")
        if type(iteration) is not int or iteration < 0:  # a bool is no count either
            raise ResexpError(
                f"{path} is damaged: its progress does not fit this run (iteration={iteration!r}, not a count of "
                f"steps); {START_OVER}"
            )
    return state


def read_archive(path: Path, file: BinaryIO) -> Any:
    """The object torch.save wrote into `file`, checked against its CRC-32s first, read as data only."""
    try:
        with zipfile.ZipFile(file) as archive:
            damaged = archive.testzip()  # the first record whose bytes do not match their CRC-32
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise unreadable(path, error) from None
    if damaged is not None:
        raise ResexpError(f"{path} is damaged: {damaged} does not match the checksum stored with it; {START_OVER}")
    file.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on foreign pickle protocols: the verdict follows anyway
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ResexpError(
            f"{path} is not a readable resexp checkpoint (it holds objects other than tensors and numbers, "
            f"and resexp loads checkpoints as data only, never as code); {START_OVER}"
        ) from None
    # A file that passed its checksums but is still not a checkpoint (made so, or written by another
    # program) can fail anywhere inside torch's unpickler: an IndexError, a TypeError, ... all say
    # "not readable".
    except Exception as error:
        raise unreadable(path, error) from None


def unreadable(path: Path, error: BaseException) -> ResexpError:
    return ResexpError(f"{path} is not a readable resexp checkpoint ({first_line(error)}); {START_OVER}")


# The settings that say where and how a run runs, or how often it reports, not what it trains: a run
# resumes with other values of these, so they are no part of the identity its checkpoint records (and a
# checkpoint that recorded some, as 0.2.0 did log_every and eval_points, is read without them).
NOT_IDENTITY = frozenset(
    {
        "data.root",
        "data.download",
        "data.workers",
        "data.decode",  # the same crops either way; the pixels differ by the decoders' rounding
        "data.eval_batch_size",
        "device",
        "cuda_graph",
        "compile",
        "deterministic",
        "resume",
        "checkpoint_every",
        "on_nonfinite",
        "log_every",
        "grad_norms_every",
        "eval_points",
    }
)


# Settings of a run's identity that older checkpoints did not record, with the value they all had: the
# model keys' are their families' (resexp.models.OLDER).
ADDED = {
    "sync_bn": False,
    "processes": 1,
    **models.OLDER,
    "schedule.warmup_iterations": None,  # came in 0.9.0: the 2015 rule was the only warm-up
    "preprocess.normalize": "mean",  # came in 0.9.0: every CIFAR run had the 2015 paper's preprocessing
    "preprocess.pad": "zeros",  # came in 0.9.0, likewise
}


def identity(values: dict[str, Any]) -> dict[str, Any]:
    """The run's identity: its settings (`a.b: value` pairs) less NOT_IDENTITY, and less what changes
    nothing in its net (its family says which model keys: resexp.models.unused_keys) and sync_bn in one
    process."""
    unused = models.unused_keys(values)
    if values.get("processes", ADDED["processes"]) == 1:  # one process's batch is the global batch
        unused.add("sync_bn")
    return {key: value for key, value in values.items() if key not in NOT_IDENTITY | unused}


def plain(value: Any) -> Any:
    """A setting as a checkpoint records it: sequences as lists (a checkpoint holds the config's lists, a
    NetSpec its tuples: model.widths [16, 160, 320, 640] and (16, 160, 320, 640) are one net)."""
    return [plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: value there, value now` for each setting in which a checkpoint's record and the current
    settings disagree."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{key}: {saved.get(key)!r} there, {current.get(key)!r} now"
        for key in keys
        if plain(saved.get(key)) != plain(current.get(key))
    ]


def check_same_run(path: Path, saved: dict[str, Any], current: dict[str, Any], another: str = "hydra.run.dir") -> None:
    """A checkpoint continues only the run that wrote it: the same net, shortcut, data and recipe (the
    identities: a run's settings but where and how it runs). Resuming with another number of processes
    is refused: without sync_bn, BN's statistics are over each process's share of the batch, so that the
    number is part of the experiment (the paper's CIFAR nets: 2 GPUs of 64 images). `another`: where a new
    run would go instead (a sweep's is hydra.sweep.dir)."""
    saved, current = {**ADDED, **saved}, {**ADDED, **current}
    before, now = saved["processes"], current["processes"]
    if before != now:
        how = (
            "without torchrun"
            if before == 1
            else f"with torchrun --nproc-per-node (and --nnodes) for {before} processes"
        )
        raise ResexpError(
            f"{path} was trained by {before} process{'es' if before > 1 else ''}, and this command runs {now}: "
            f"resume it {how}, or use another {another} to start a new run"
        )
    if found := differences(identity(saved), identity(current)):
        raise ResexpError(
            f"{path} belongs to another experiment ({'; '.join(found)}); "
            f"use the same settings to resume it, or another {another} to start a new run"
        )
