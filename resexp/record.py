"""What one `resexp train` command notes before Hydra writes anything, and puts back if the command
fails: Hydra writes a run's saved config before its task can refuse the run (another net,
resume=false), and makes a sweep's directory before it composes the sweep's runs, so that bad input
would otherwise leave them changed. And the lock of each run or sweep directory (resexp/lock.py),
taken before Hydra writes there, so that a second process is refused before it changes a byte.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from resexp import distributed, lock
from resexp.errors import Interrupted, JobFailed, ResexpError
from resexp.files import read_bytes, refuse_links
from resexp.runs import SWEEP_RECORD, Place, holds_run, snapshot, take_back_sweep, written_through

# What Hydra is about to write over, noted before it does (RunRecord): each sweep's directory, whether
# the user chose it, and its record if it held one; the files of each run directory that held a run.
SWEEPS: list[tuple[Path, bool, bytes | None]] = []
RUNS: list[tuple[Path, bool]] = []  # each lone run's directory, and whether the user chose it
HELD: dict[Path, dict[str, bytes]] = {}


class RunRecord(Callback):
    """A Hydra callback (conf/train.yaml, hydra.callbacks) that, before Hydra writes anything, takes the
    lock of the run's directory, or of the sweep's (resexp/lock.py: a second process there is refused
    before it changes a byte), and notes each sweep's directory, and the files of every run directory
    that holds a run already: Hydra writes a run's saved config before its task can refuse it (another
    net, resume=false), and makes a sweep's directory before it composes the runs, so that bad input
    would otherwise leave them changed. `recorded` and Place.take_back put them back. And it refuses a
    directory where Hydra, or the run, would write through a symbolic link (runs.written_through: planted by
    whoever else can write there). Under several processes, rank 0 alone: it alone writes there."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not distributed.WORLD.main:
            return
        run_dir = Path(config.hydra.run.dir).absolute()
        hold_or_fail(run_dir)
        refuse_or_fail(written_through(run_dir))
        RUNS.append((run_dir, user_chose_directory(config.hydra)))
        if holds_run(run_dir):
            HELD[run_dir] = snapshot(run_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not distributed.WORLD.main:
            return
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        record = sweep_dir / SWEEP_RECORD
        hold_or_fail(sweep_dir)
        # the sweep's runs: each directory in it, which Hydra writes into without looking
        inside = sorted(sweep_dir.iterdir()) if sweep_dir.is_dir() else []
        refuse_or_fail([record, *inside, *(path for run_dir in inside for path in written_through(run_dir))])
        before = read_bytes(record) if record.is_file() else None
        SWEEPS.append((sweep_dir, user_chose_directory(config.hydra), before))
        for run_dir in inside:
            if holds_run(run_dir):
                HELD[run_dir] = snapshot(run_dir)


def user_chose_directory(hydra_cfg: DictConfig) -> bool:
    """Whether the command line set hydra.run.dir or hydra.sweep.dir (else they are outputs/'s defaults)."""
    chosen = {override.split("=", 1)[0].lstrip("+~") for override in hydra_cfg.overrides.hydra}
    return bool({"hydra.run.dir", "hydra.sweep.dir"} & chosen)


def hold_or_fail(directory: Path) -> None:
    """The lock of `directory`, or the refusal as JobFailed: Hydra turns a callback's Exception into a
    warning and goes on."""
    try:
        lock.hold(directory)
    except ResexpError as error:
        raise JobFailed(error) from None


def refuse_or_fail(paths: list[Path]) -> None:
    """No symbolic link among the paths Hydra is about to write (files.refuse_links), or the refusal as JobFailed."""
    try:
        refuse_links(paths)
    except ResexpError as error:
        raise JobFailed(error) from None


def take_back_runs() -> None:
    """What Hydra made for the runs this command met, where nothing of a run is in them (a stop, or a full
    disk, before a run could start: its saved config and log); a directory that held a run already is put
    back as it was, byte for byte (Place.take_back)."""
    places = [Place(run_dir, chosen=chosen, before=HELD.get(run_dir)) for run_dir, chosen in RUNS]
    for sweep_dir, chosen, _ in SWEEPS:  # a sweep's runs that held nothing before: others may have trained since
        inside = sorted(sweep_dir.iterdir()) if sweep_dir.is_dir() else []
        new = [path for path in inside if path not in HELD and path.is_dir() and not path.is_symlink()]
        places += [Place(run_dir, in_sweep=True, chosen=chosen) for run_dir in new]
    for place in places:
        place.take_back()


@contextmanager
def recorded() -> Iterator[None]:
    """One `resexp train` command, with what RunRecord notes: a command that fails (bad input, mostly)
    leaves no sweep directory without a run, nor the default folders around it empty, and one stopped
    between a sweep's runs says how to resume it; at its end, however it ends, the locks it took are
    let go."""
    SWEEPS.clear()
    RUNS.clear()
    HELD.clear()
    try:
        yield
    except BaseException as error:
        sweep_dir = SWEEPS[-1][0] if SWEEPS else None
        if isinstance(error, OSError) or (isinstance(error, Interrupted) and not error.training):
            take_back_runs()  # Hydra wrote them, and no run trained: what the message says is true, nothing half-made
        while SWEEPS:
            take_back_sweep(*SWEEPS.pop())
        if isinstance(error, Interrupted) and not error.resume and sweep_dir is not None and sweep_dir.is_dir():
            resume = f"run the same sweep again with {shlex.quote(f'hydra.sweep.dir={sweep_dir}')}"
            raise Interrupted(error.signum, error.iteration, resume, error.training) from None
        raise
    finally:
        lock.release()
