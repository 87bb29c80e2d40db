"""`resexp SUBCOMMAND ...`: the entry point, and the only code that ends the process. With resexp/config.py,
the only code that reads the config.

`resexp train [overrides]` is a real Hydra app (multirun, --cfg, --help, hydra.run.dir all work): the
dispatcher takes the subcommand off sys.argv and hands the rest to a @hydra.main function, whose task
turns the config into settings (config.py) and runs them (resexp/jobs.py). Whatever ends a run early
is raised to here and reported as one line: exit code 2 for bad input, 128 + N for signal N.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from resexp.errors import Interrupted, JobFailed, LostProcess, ResexpError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from resexp.saved import SavedRun

# Hydra, torch and the rest are imported once a command needs them: `resexp --help` answers at once.

COMMANDS = {
    "train": "train a plain or residual net (a Hydra app: `resexp train --help`, `resexp train -m ...`)",
    "report": "the runs under some directories as the paper's tables and figures (`resexp report --help`)",
    "eval": "the test error of trained runs from their checkpoints, single view and 10-crop (`resexp eval --help`)",
    "export": "a trained run's weights alone, and torchvision's keys where the net is torchvision's (`resexp export --help`)",
    "prepare": "pack ImageNet's class folders, or Imagenette, once for data=imagenet_packed (`resexp prepare --help`)",
    "analyze": "why residual learning works, on trained runs: layer responses, gradients, lesions, loss landscapes (`resexp analyze --help`)",
}
USAGE = (
    "usage: resexp {"
    + ",".join(COMMANDS)
    + "} [args]  |  resexp --version\n\ncommands:\n"
    + "".join(f"  {name:8s}{text}\n" for name, text in COMMANDS.items())
    + "\nshell completion (bash; zsh after `autoload -Uz bashcompinit && bashcompinit`):\n"
    + '  eval "$(resexp train -sc install=bash)"\n'
)
COMPLETION = ("-sc", "--shell-completion")  # Hydra's flag, which its bash completion calls back with
# Hydra's flags that each pick what the app does: at most one at a time.
MODES = {"multirun": "-m", "cfg": "--cfg", "info": "--info", "shell_completion": "-sc"}


def train_task(cfg: DictConfig) -> float | None:
    """The Hydra task of every run: settings from the config, the run prepared, then trained (or handed to
    the shared-GPU launcher's batch). Bad input takes back what Hydra made for the run, and ends the command.
    Under several processes (torchrun, or submitit's tasks, which start here) rank 0 alone writes; in a
    submitit job a stop by its preemption signal is handed on to submitit, which requeues the job."""
    from hydra.core.hydra_config import HydraConfig

    from resexp import config, distributed, jobs, lock, logs

    world = distributed.start()  # submitit's tasks; torchrun's processes started in `train`
    hydra_cfg = HydraConfig.get()
    place = config.place(hydra_cfg)
    handed = False  # to the shared-GPU launcher's batch, which trains it later: its lock stays held
    try:
        with logs.named_lines(place.run_dir.name if place.in_sweep and not jobs.collecting else "", world):
            if world.main:
                lock.hold(place.run_dir)  # a sweep's run (a lone run took it before Hydra wrote: resexp/record.py)
            with jobs.taken_back(place) if world.main else nullcontext():
                job = jobs.prepare(config.settings(cfg, hydra_cfg, place))
            test_error = jobs.start(job)
        handed = test_error is None
        return test_error
    except ResexpError as error:
        raise JobFailed(error) from None
    except Interrupted as stop:  # stopped while no run trained: say how to go on all the same
        if stop.signum == distributed.preemption_signal():
            lock.release(place.run_dir)
            signal.raise_signal(stop.signum)  # submitit's own handler: it requeues the job, which resumes
        if stop.training:
            raise
        raise Interrupted(stop.signum, resume=config.resume_command(hydra_cfg), training=False) from None
    finally:
        if not handed:  # the run is over: a launcher's worker process (joblib) may live on
            lock.release(place.run_dir)


def fail(message: str, code: int = 2) -> NoReturn:
    from resexp import launch

    launch.error_file_line(message)  # under torchrun: for its report, or resexp's launch (resexp/launch.py)
    if not launch.quiet():  # started by `resexp train --nproc-per-node`, which prints one line for all
        rank = os.environ.get("RANK", "0")  # under torchrun each process says it: name the others
        # One write of the whole line: print's two (the text, then its newline) let another rank's line
        # land between them on a shared stderr, two lines run together (seen in the suite under torchrun)
        sys.stderr.write(f"resexp{f' (rank {rank})' if rank != '0' else ''}: {message}\n")
        sys.stderr.flush()
    sys.exit(code)


def outcome(error: BaseException) -> tuple[str, int] | None:
    """What an error that ended `resexp train` tells the user, and the exit code; None for a bug."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from resexp import schemas

    if isinstance(error, KeyboardInterrupt):  # where resexp's own handler was not yet in place
        error = Interrupted(signal.SIGINT, training=False)
    if isinstance(error, Interrupted):
        name, code = signal.Signals(error.signum).name, 128 + error.signum
        resume = f"; resume: {error.resume}" if error.resume else ""
        if not error.training:
            return f"stopped by {name} while no run was training; nothing half-made is left{resume}", code
        if error.iteration is None:
            return f"stopped at once; the last checkpoint of each run, if any, is intact{resume}", code
        return f"stopped by {name} at iteration {error.iteration}, checkpoint saved{resume}", code
    if isinstance(error, ResexpError):
        return f"error: {error}", 1 if isinstance(error, LostProcess) else 2
    if isinstance(error, (HydraException, OmegaConfBaseException)):  # before OSError: Hydra's missing config is one
        return f"error: {schemas.error_line(error)}", 2
    if isinstance(error, OSError):  # typically the run directory: not writable, not a directory, disk full
        where = f" {error.filename}" if error.filename else ""
        reason = error.strerror or error
        if error.errno in (errno.ENOSPC, errno.EDQUOT):  # the folder is fine: the disk is not
            return f"error: cannot write{where} ({reason}); free some space there, then run the same command", 2
        return f"error: cannot write{where} ({reason}); choose a writable hydra.run.dir or hydra.sweep.dir", 2
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
    except OSError as error:  # the folder for the tables: not writable, not a folder, full
        where = error.filename or args.out or args.dirs[0]
        fail(f"error: cannot write {where} ({error.strerror or error}); choose another --out")


def trained_runs(parser: argparse.ArgumentParser, rest: list[str]) -> tuple[argparse.Namespace, list[SavedRun]]:
    """`resexp eval` and `export`: the runs with a checkpoint below the directories given, made again
    from their own records (config.saved_run)."""
    from resexp import config, runs

    parser.add_argument("dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run or sweep directories")
    parser.add_argument("--data-root", help="the data's folder, where it is not where the run had it (data.root)")
    args = parser.parse_args(rest)
    config.register()
    found = runs.find_runs(args.dirs, marks=(runs.CHECKPOINT,))
    if not found:
        raise ResexpError(f"no run with a {runs.CHECKPOINT} under {', '.join(map(str, args.dirs))}")
    return args, [config.saved_run(path, args.data_root) for path in found]


def evaluate(rest: list[str]) -> None:
    import json

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from resexp import config, runs
    from resexp.files import atomic_write_text
    from resexp.saved_commands import evaluate_run

    parser = argparse.ArgumentParser(prog="resexp eval", description=COMMANDS["eval"].split(" (")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="fp32 (default) or bf16 autocast")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON (- for stdout)")
    try:
        args, saved = trained_runs(parser, rest)
        device = config.pick_device(args.device)
        rows = [
            {**row, "state": runs.state(run.run_dir).short}  # as `resexp report` and `analyze` say it
            for run in saved
            for row in evaluate_run(run, device, args.precision)
        ]
    except ResexpError as error:
        fail(f"error: {error}")
    table = Table("run", "net", "state", "iteration", "set", "views", "top-1 err %", "top-5 err %")
    for row in rows:
        top5 = f"{row['error_top5']:.2f}" if "error_top5" in row else "-"
        cells = (row["run"], row["net"], row["state"], row["iteration"], row["set"], row["views"])
        cells += (f"{row['error']:.2f}", top5)
        table.add_row(*(Text(str(cell)) for cell in cells))  # a path is text, never markup
    text = json.dumps(rows, indent=2) + "\n"
    if args.json is not None and str(args.json) == "-":
        sys.stdout.write(text)
        return
    console = Console()
    if not console.is_terminal:  # a file or a pipe: whole paths rather than the 80 columns assumed
        console.width = 200
    console.print(table)
    if args.json is not None:
        try:
            atomic_write_text(args.json, text)
        except OSError as error:
            fail(f"error: cannot write {args.json} ({error.strerror or error})")


def export(rest: list[str]) -> None:
    from resexp.saved_commands import export_run

    parser = argparse.ArgumentParser(prog="resexp export", description=COMMANDS["export"].split(" (")[0])
    parser.add_argument("--out", type=Path, metavar="DIR", help="where the files go (default: each run's directory)")
    try:
        args, saved = trained_runs(parser, rest)
        for run in saved:
            for path in export_run(run, args.out or run.run_dir):
                print(path)
    except ResexpError as error:
        fail(f"error: {error}")
    except OSError as error:  # the folder for the files: not writable, not a folder, full
        fail(f"error: cannot write {error.filename or args.out} ({error.strerror or error}); choose another --out")


# analyze's options, at most: each measurement's cost and memory grow with them (a plane of N points per
# side is N*N losses over --train-batches batches each), and nothing gains from more.
ANALYZE_LIMITS = {"images": 1_000_000, "train_batches": 1000, "draws": 1000, "points": 1001}
PLANE_LIMIT = 101


def analyze(rest: list[str]) -> None:
    from resexp import analyze, config

    parser = argparse.ArgumentParser(prog="resexp analyze", description=COMMANDS["analyze"].split(" (")[0])
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="where the figures and tables go (default: the first RUN_DIR)"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--images", type=int, help="test images for the responses and lesions (10000 on a GPU, 1000 on a CPU)"
    )
    parser.add_argument(
        "--train-batches", type=int, default=4, help="training batches for the gradients and the loss slice (4)"
    )
    parser.add_argument("--draws", type=int, default=5, help="random draws per number of deleted blocks (5)")
    parser.add_argument("--points", type=int, default=21, help="points of the 1-D loss slice (21)")
    parser.add_argument(
        "--plane", type=int, default=0, help="points per side of a 2-D loss surface, N*N losses (0: none; 11 takes 121)"
    )
    out = None
    try:
        args, saved = trained_runs(parser, rest)
        device = config.pick_device(args.device)
        if args.images is None:  # a lesion study evaluates ResNet-110 about 300 times: hours over 10k on a CPU
            args.images = 10000 if device.type == "cuda" else 1000
        for name, most in ANALYZE_LIMITS.items():
            value, flag = getattr(args, name), f"--{name.replace('_', '-')}"
            if value < 1:
                raise ResexpError(f"{flag}={value} must be 1 or more")
            if value > most:
                raise ResexpError(f"{flag}={value} must be at most {most:,}")
        if args.plane < 0 or args.plane == 1:
            raise ResexpError(f"--plane={args.plane} must be 0 (no surface) or 2 or more")
        if args.plane > PLANE_LIMIT:
            raise ResexpError(f"--plane={args.plane} must be at most {PLANE_LIMIT} ({PLANE_LIMIT**2:,} losses)")
        budget = analyze.Budget(args.images, args.train_batches, args.draws, args.points, args.plane)
        out = args.out or args.dirs[0]
        results = analyze.analyze(saved, out, device, budget)
    except ResexpError as error:
        fail(f"error: {error}")
    except OSError as error:
        fail(f"error: cannot write {error.filename or out} ({error.strerror or error}); choose another --out")
    print(analyze.markdown(results))
    print(f"figures and tables: {out}")


def prepare(rest: list[str]) -> None:
    from resexp import prepare
    from resexp.config import cpu_cores

    parser = argparse.ArgumentParser(prog="resexp prepare", description=prepare.__doc__.splitlines()[0])
    parser.add_argument(
        "source", metavar="SOURCE", help="a folder of train/<class>/* and val/<class>/* (ImageNet's), or imagenette"
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="where the packed files go (data.root of the runs)")
    parser.add_argument("--size", type=int, default=128, help="S, the side of the packed squares (128)")
    parser.add_argument("--workers", type=int, help="decoding processes (default: one per CPU core)")
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable images out, listed in the manifest")
    parser.add_argument("--chunk", type=int, default=256, help="images per task of a worker, and per progress record")
    parser.add_argument(
        "--imagenette-size", default="160px", help="which Imagenette download: full, 320px or 160px (160px)"
    )
    args = parser.parse_args(rest)
    workers = cpu_cores() if args.workers is None else args.workers
    if workers < 0:
        fail(f"error: --workers={workers} must be 0 (decode here) or more")
    if args.chunk < 1:
        fail(f"error: --chunk={args.chunk} must be 1 or more")
    out = args.out.expanduser().absolute()
    try:
        prepare.check_size(args.size)
        out.mkdir(parents=True, exist_ok=True)
        for split in prepare.sources(args.source, out, args.imagenette_size):
            began, already = time.perf_counter(), prepare.prepared(split, out, args.size) is not None
            manifest = prepare.pack(split, out, args.size, workers, args.skip_bad, args.chunk)
            by = "in this process" if workers == 0 else f"with {workers} worker{'s' if workers > 1 else ''}"
            took = "prepared already" if already else f"{time.perf_counter() - began:.1f} s {by}"
            skipped = f", {len(manifest['skipped'])} skipped" if manifest["skipped"] else ""
            gib = manifest["slots"] * 3 * args.size**2 / 2**30
            print(
                f"{split.split}: {manifest['images']:,} images in {len(manifest['classes'])} classes{skipped}, "
                f"{gib:.2f} GiB at {args.size}x{args.size}, {took} -> {out}"
            )
    except ResexpError as error:
        fail(f"error: {error}")
    except OSError as error:
        fail(f"error: cannot write {error.filename or out} ({error.strerror or error}); choose another OUT")


def complete(argv: list[str]) -> None:
    """Hydra's bash completion, which calls `resexp -sc query=bash` back with the line typed so far
    (COMP_LINE): the commands while the first word is typed, then for `resexp train` Hydra's own
    answer, given the line as Hydra's app alone would see it."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if not any(arg.startswith("query") for arg in argv):  # install or uninstall: Hydra's script
        return train(argv)
    if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
        print(" ".join(COMMANDS))
    elif words[1] == "train":
        os.environ["COMP_LINE"] = line.replace(" train", "", 1)  # Hydra drops the app's name, one word
        train(argv)
    # the other commands take paths: the shell completes them (-o default)


def check_modes(rest: list[str]) -> list[str]:
    """Hydra refuses two of -m, --cfg, --info, -sc with a traceback: say it in one line. Returns the
    overrides among `rest` (as Hydra's parser reads them: `-sc query=bash` is a flag's value)."""
    from hydra._internal.utils import get_args_parser

    try:
        args, _ = get_args_parser().parse_known_args(rest)
    except SystemExit:  # a malformed flag: Hydra's own parser says what is wrong
        return []
    given = [flag for name, flag in MODES.items() if getattr(args, name)]
    if len(given) > 1:
        fail(
            f"error: {' and '.join(given)} cannot be used together; for the config of a sweep's runs, "
            "drop -m and give one run's values (`resexp train --cfg job model=plain56`)"
        )
    if not given:  # one run: a preset that is a sweep would train one default net instead of its runs
        from resexp import config

        if said := config.sweep_preset([arg for arg in args.overrides if "=" in arg]):
            fail(f"error: {said}")
    return [] if args.shell_completion else [arg for arg in args.overrides if "=" in arg]  # -sc query=bash: Hydra's


def train(rest: list[str]) -> None:
    """`resexp train`: Hydra's app, with every way it can end told in one line."""
    import hydra
    from hydra.core.plugins import Plugins

    from resexp import config, distributed, record
    from resexp.step import CUBLAS_WORKSPACE

    # Deterministic cuBLAS reads its workspace setting when it first runs, which in a sweep may be before
    # the deterministic runs train (their batch comes later): set before any run. Eight 4 MiB workspaces,
    # which a ResNet's one matmul (its classifier) does not miss.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if "--version" in rest:  # Hydra's flag would print Hydra's version alone
        import resexp

        print(f"resexp {resexp.__version__} (Hydra {hydra.__version__})")
        return
    overrides = check_modes(rest)
    if not distributed.start().main:  # under torchrun: rank 0 writes Hydra's record of the run
        rest = [*rest, "hydra.output_subdir=null"]
    config.register()
    # Hydra's completion script registers sys.argv[0]: the command `resexp`, whose dispatcher answers
    # the completion queries (complete).
    sys.argv = ["resexp" if COMPLETION[0] in rest or COMPLETION[1] in rest else "resexp train", *rest]
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
        with record.recorded():  # a sweep that ended before any of its runs started leaves no directory
            config.check_overrides(overrides)
            hydra.main(config_path=config_path, config_name="train", **config.HYDRA_MAIN)(train_task)()
        distributed.finish()  # every process is done: they leave together
    except BrokenPipeError:  # not the run directory: the reader of a pipe left (main)
        raise
    except (Exception, KeyboardInterrupt, Interrupted, JobFailed) as error:
        told = outcome(error.error if isinstance(error, JobFailed) else error)
        if told is None:
            raise  # a bug: its whole traceback
        if isinstance(error, Interrupted) and error.iteration is not None:  # every rank stopped at this step
            distributed.finish()
        fail(*told)


def stop_at_once(signum: int, frame: object) -> None:
    """SIGTERM or SIGINT while no run trains (training has handlers of its own: resexp.train.stop_requests):
    the command ends where it is, and what a run being prepared had made is taken back on the way out."""
    raise Interrupted(signum, training=False)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # From the first instant, so that a stop during start-up (imports, Hydra's composition, a run's
    # preparation) is one line too, and SIGTERM does not end the process before it can tidy up.
    previous = {signum: signal.signal(signum, stop_at_once) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        dispatch(argv)
    except (Interrupted, KeyboardInterrupt) as stop:  # outside `resexp train`, which says more
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        fail(f"stopped by {signal.Signals(signum).name}", 128 + signum)
    except BrokenPipeError:  # `resexp train --help | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail again
        sys.exit(128 + signal.SIGPIPE)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        import resexp

        print(f"resexp {resexp.__version__}")
        return
    command, rest = argv[0], argv[1:]
    if command == "train" and "RANK" not in os.environ:  # not yet one of torchrun's processes
        from resexp import launch

        flags, rest = launch.split(rest)
        if flags:
            launch.torchrun(flags, rest)
    if command in COMPLETION:
        return complete(argv)
    if command not in COMMANDS:
        fail(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
    if command == "report":
        return report(rest)
    if command == "eval":
        return evaluate(rest)
    if command == "export":
        return export(rest)
    if command == "analyze":
        return analyze(rest)
    if command == "prepare":
        return prepare(rest)
    train(rest)
