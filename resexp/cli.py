"""`resexp SUBCOMMAND ...`: the entry point, and the only code that ends the process. With resexp/config.py,
the only code that reads the config.

`resexp train [overrides]` is a real Hydra app (multirun, --cfg, --help, hydra.run.dir all work): the
dispatcher takes the subcommand off sys.argv and hands the rest to a @hydra.main function, whose task
turns the config into settings (config.py) and runs them (resexp/jobs.py). Whatever ends a run early
is raised to here and reported as one line: exit code 2 for bad input, 128 + N for signal N.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from resexp.errors import Interrupted, JobFailed, ResexpError

if TYPE_CHECKING:
    from omegaconf import DictConfig

# Hydra, torch and the rest are imported once a command needs them: `resexp --help` answers at once.

COMMANDS = {
    "train": "train a plain or residual net (a Hydra app: `resexp train --help`, `resexp train -m ...`)",
    "report": "the runs under some directories as the paper's tables and figures (`resexp report --help`)",
}
USAGE = (
    "usage: resexp {"
    + ",".join(COMMANDS)
    + "} [args]\n\ncommands:\n"
    + "".join(f"  {name:8s}{text}\n" for name, text in COMMANDS.items())
)


def train_task(cfg: DictConfig) -> float | None:
    """The Hydra task of every run: settings from the config, the run prepared, then trained (or handed to
    the shared-GPU launcher's batch). Bad input takes back what Hydra made for the run, and ends the command."""
    from hydra.core.hydra_config import HydraConfig

    from resexp import config, jobs

    hydra_cfg = HydraConfig.get()
    place = config.place(hydra_cfg)
    try:
        with jobs.taken_back(place):
            job = jobs.prepare(config.settings(cfg, hydra_cfg, place))
        return jobs.start(job)
    except ResexpError as error:
        raise JobFailed(error) from None


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"resexp: {message}", file=sys.stderr)
    sys.exit(code)


def outcome(error: BaseException) -> tuple[str, int] | None:
    """What an error that ended `resexp train` tells the user, and the exit code; None for a bug."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from resexp import schemas

    if isinstance(error, Interrupted):
        if error.iteration is None:
            return (
                f"stopped at once; the last checkpoint of each run, if any, is intact; resume: {error.resume}",
                128 + error.signum,
            )
        name = signal.Signals(error.signum).name
        return (
            f"stopped by {name} at iteration {error.iteration}, checkpoint saved; resume: {error.resume}",
            128 + error.signum,
        )
    if isinstance(error, KeyboardInterrupt):  # before training began: no checkpoint is being written
        return "stopped at once, before training; the checkpoints already written are intact", 128 + signal.SIGINT
    if isinstance(error, ResexpError):
        return f"error: {error}", 2
    if isinstance(error, OSError):  # typically the run directory: not writable, not a directory, disk full
        where = f" {error.filename}" if error.filename else ""
        reason = error.strerror or error
        return f"error: cannot write{where} ({reason}); choose a writable hydra.run.dir or hydra.sweep.dir", 2
    if isinstance(error, (HydraException, OmegaConfBaseException)):
        return f"error: {schemas.error_line(error)}", 2
    return None


def report(rest: list[str]) -> None:
    from resexp import report  # TensorBoard's event reader and matplotlib: only for reports

    parser = argparse.ArgumentParser(prog="resexp report", description=report.__doc__.splitlines()[0])
    parser.add_argument(
        "dirs", nargs="+", type=Path, metavar="DIR", help="run or sweep directories (searched recursively)"
    )
    parser.add_argument(
        "--out", type=Path, help="where results.md, results.csv and the figures go (default: the first DIR)"
    )
    args = parser.parse_args(rest)
    try:
        report.report(args.dirs, args.out)
    except ResexpError as error:
        fail(f"error: {error}")


def train(rest: list[str]) -> None:
    """`resexp train`: Hydra's app, with every way it can end told in one line."""
    import hydra
    from hydra.core.plugins import Plugins

    from resexp import config

    config.register()
    sys.argv = ["resexp train", *rest]
    source = config.config_dir()
    config_path = str(source) if isinstance(source, Path) else "pkg://resexp.conf"
    # Hydra then raises its errors instead of printing a trimmed stack trace, and they are reported
    # below in one line; an unexpected error (a bug) still shows its whole traceback.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    # Hydra finds plugins by scanning the hydra_plugins namespace package, which editable installs
    # (setuptools >= 64) can hide: register resexp's launcher by hand.
    from hydra_plugins.resexp_launcher.shared_gpu_launcher import SharedGPULauncher

    Plugins.instance().register(SharedGPULauncher)
    try:
        with config.sweeps_taken_back():  # a sweep that ended before any of its runs started leaves no directory
            config.check_choices([arg for arg in rest if "=" in arg and not arg.startswith("-")])
            hydra.main(version_base="1.3", config_path=config_path, config_name="train")(train_task)()
    except (Exception, KeyboardInterrupt, Interrupted, JobFailed) as error:
        told = outcome(error.error if isinstance(error, JobFailed) else error)
        if told is None:
            raise  # a bug: its whole traceback
        fail(*told)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
    if command == "report":
        return report(rest)
    train(rest)
