"""`resexp SUBCOMMAND ...`: the entry point. With resexp/config.py, the only code that reads the config.

`resexp train [overrides]` is a real Hydra app (multirun, --cfg, --help, hydra.run.dir all work): the
dispatcher takes the subcommand off sys.argv and hands the rest to a @hydra.main function. Errors are
reported here, as one line each, with exit code 2 for bad input and 128 + N for signal N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

import resexp
from resexp import checkpoint
from resexp.config import (
    check_choices,
    config_dir,
    experiment_of,
    make_model,
    make_schedule,
    pick_device,
    pick_on_nonfinite,
    pick_precision,
    positive,
)
from resexp.errors import Interrupted, ResexpError
from resexp.logs import Display, displays, log, write_json
from resexp.models import canonical_shortcut, count_parameters
from resexp.models.resnet import net_name
from resexp.step import Step, make_step
from resexp.train import restore, stop_requests, train

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


def previous_run(run_dir: Path, resume: bool, experiment: dict[str, Any]) -> dict[str, Any] | None:
    """What `run_dir` already holds: None (a new run), {"metrics": ...} (a finished run), or a
    checkpoint to continue. Never overwrites: without resume=true an existing run is an error."""
    metrics, saved = run_dir / "metrics.json", run_dir / checkpoint.FILENAME
    if not saved.exists() and not metrics.exists():
        return None
    if not resume:
        raise ResexpError(
            f"{run_dir} already holds a run; resume=true continues it, another hydra.run.dir starts a new one"
        )
    state = checkpoint.load(saved) if saved.exists() else None
    if state is not None:
        checkpoint.check_same_experiment(saved, state["experiment"], experiment)
    if metrics.exists():
        return {"metrics": json.loads(metrics.read_text())}
    return state


@dataclass
class Job:
    """A run built from its config and ready to train: only its step and `train` are left, neither of
    which reads the config, so the runs of a sweep can train side by side (hydra_plugins/resexp_launcher/)."""

    label: str  # how log lines and progress bars name it: the net, or in a sweep what sets it apart
    run_dir: Path  # where it writes
    iterations: int  # steps of its schedule
    device: torch.device  # where it trains
    train: Callable[[Display, list[int], Step | None], float]  # (display, stop signals, step) -> final test error
    model: nn.Module | None = None  # what its step trains (None: the run finished already)
    optimizer: torch.optim.Optimizer | None = None
    step_options: dict[str, Any] = field(default_factory=dict)  # make_step's keywords
    kin: str = ""  # runs with the same kin have the same layers (seeds; plain/residual twins, option A): they can train as one group (resexp/group.py)

    def make_step(self) -> Step | None:
        return None if self.model is None else make_step(self.model, self.optimizer, **self.step_options)


def prepare(cfg: DictConfig) -> Job:
    """Build everything the config names, up to the first step; its `train` trains (or resumes) and
    writes metrics.json."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    schedule = make_schedule(cfg)
    batch_size = positive("schedule.batch_size", cfg.schedule.batch_size)
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    on_nonfinite = pick_on_nonfinite(cfg.on_nonfinite)
    settings = dict(  # plain values: the job must not read cfg once it trains beside others
        eval_every=math.ceil(schedule.iterations / positive("eval_points", cfg.eval_points)),
        log_every=positive("log_every", cfg.log_every),
        checkpoint_every=positive("checkpoint_every", cfg.checkpoint_every),
        on_nonfinite=on_nonfinite,
        precision=precision,
    )
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once

    torch.manual_seed(cfg.seed)  # weight initialisation; the data stream has a generator of its own
    model, name = make_model(cfg)
    experiment = experiment_of(cfg, list(hydra_cfg.job.config.override_dirname.exclude_keys))
    previous = previous_run(run_dir, cfg.resume, experiment)
    if previous is not None and "metrics" in previous:
        log.info("%s finished already (%s): nothing to do", name, run_dir / "metrics.json")
        error = previous["metrics"]["final"]["error/test"]
        return Job(name, run_dir, 0, device, lambda screen, stops, step: error)
    model.to(device, memory_format=torch.channels_last)  # the layout to_device gives the images
    if not cfg.model.residual:
        log.info("%s is a plain net: shortcut=%s has no effect", name, cfg.shortcut)
    data = instantiate(cfg.data)(batch_size=batch_size, seed=cfg.seed, device=device)
    optimizer = instantiate(cfg.optim)(model.parameters())
    base_lr = cfg.optim.lr  # the schedule scales this; a checkpoint's optimizer holds the scaled one
    if previous is not None:
        restore(model, optimizer, data, previous)
    step_options = dict(
        batch_shape=(batch_size, *data.image_shape),
        precision=precision,
        cuda_graph=bool(cfg.cuda_graph),
        compile_model=bool(cfg.compile),
        skip_nonfinite=on_nonfinite == "skip",
    )
    # Runs alike in all but the seed, on one device and at one iteration, can train as one group; so can
    # plain and residual twins with option A's shortcuts, which have no weights (resexp/group.py).
    done = previous["progress"]["iteration"] if previous is not None else 0
    apart = {"seed", "model.residual"} if experiment["shortcut"] == "identity" else {"seed"}
    kin = json.dumps(
        [{key: value for key, value in experiment.items() if key not in apart}, str(device), step_options, done],
        default=str,
    )
    params = count_parameters(model)
    log.info(
        "%s: %s parameters, %d iterations at batch %d on %s (%s) -> %s",
        name,
        f"{params:,}",
        schedule.iterations,
        batch_size,
        device,
        precision,
        run_dir,
    )
    about = {  # what the run is, for metrics.json and TensorBoard's HPARAMS tab
        "net": name,
        "model": hydra_cfg.runtime.choices.get("model"),
        "data": hydra_cfg.runtime.choices.get("data"),
        "depth": cfg.model.depth,
        "residual": cfg.model.residual,
        "shortcut": canonical_shortcut(cfg.shortcut) if cfg.model.residual else None,  # plain nets have none
        "params": params,
        "iterations": schedule.iterations,
        "batch_size": batch_size,
        "lr": cfg.optim.lr,
        "seed": cfg.seed,
    }

    def train_and_record(screen: Display, stops: list[int], step: Step) -> float:
        summary = train(
            model,
            optimizer,
            step,
            data,
            schedule,
            base_lr=base_lr,
            device=device,
            run_dir=run_dir,
            screen=screen,
            stops=stops,
            experiment=experiment,
            hparams={**about, "shortcut": about["shortcut"] or "none"},
            resume=previous,
            **settings,
        )
        write_json(
            run_dir / "metrics.json",
            {
                **about,
                "precision": precision,
                "images_per_s": schedule.iterations * batch_size / summary["train_time_s"],
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "python": platform.python_version(),
                "resexp": resexp.__version__,
                **summary,
            },
        )
        final = summary["final"]
        log.info(
            "done: train err %.2f%%  test err %.2f%%  -> %s",
            final["error/train"],
            final["error/test"],
            run_dir / "metrics.json",
        )
        return final["error/test"]

    return Job(name, run_dir, schedule.iterations, device, train_and_record, model, optimizer, step_options, kin)


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"resexp: {message}", file=sys.stderr)
    sys.exit(code)


def discard_if_empty(directory: Path, hydra_files: set[str]) -> None:
    """After bad input: remove what Hydra made for this run (`hydra_files`) if the directory holds nothing
    else, so a typo leaves no half-made run behind. A directory with anything more is never touched."""
    if not directory.is_dir() or {entry.name for entry in directory.iterdir()} - hydra_files:
        return
    for name in hydra_files:
        target = directory / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    directory.rmdir()


def discard_default_parents(directory: Path, hydra_cfg: DictConfig) -> None:
    """After bad input: the folders under outputs/ that the default run and sweep directories nest in
    (outputs/<date>/, outputs/multirun/<date>/), where they are left empty. The folders around a
    hydra.run.dir or hydra.sweep.dir that the user chose are never touched."""
    chosen = {override.split("=", 1)[0].lstrip("+~") for override in hydra_cfg.overrides.hydra}
    if {"hydra.run.dir", "hydra.sweep.dir"} & chosen:
        return
    for parent in directory.parents:
        if not parent.is_relative_to("outputs") or parent == Path("outputs"):
            break
        discard_if_empty(parent, set())


def discard_sweep(hydra_cfg: DictConfig) -> None:
    """After bad input: the sweep directory, and the default folders it nests in, if nothing else is there."""
    discard_if_empty(Path(hydra_cfg.sweep.dir), {"multirun.yaml"})
    discard_default_parents(Path(hydra_cfg.sweep.dir), hydra_cfg)


def drop_unstarted(hydra_cfg: DictConfig) -> None:
    """Bad input: take back the directories Hydra made for a run that never started."""
    discard_if_empty(Path(hydra_cfg.runtime.output_dir), {".hydra", "train.log"})
    if hydra_cfg.mode == RunMode.MULTIRUN:
        discard_sweep(hydra_cfg)
    else:
        discard_default_parents(Path(hydra_cfg.run.dir), hydra_cfg)


def resume_hint(hydra_cfg: DictConfig) -> str:
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f"run the same sweep again with hydra.sweep.dir={hydra_cfg.sweep.dir}"
    run_dir = hydra_cfg.runtime.output_dir
    return " ".join(
        ["resexp train", *map(shlex.quote, hydra_cfg.overrides.task), shlex.quote(f"hydra.run.dir={run_dir}")]
    )


def stopped(signum: int, iteration: int, hydra_cfg: DictConfig) -> NoReturn:
    fail(
        f"stopped by {signal.Signals(signum).name} at iteration {iteration}, checkpoint saved; resume: {resume_hint(hydra_cfg)}",
        128 + signum,
    )


def prepare_task(cfg: DictConfig) -> Job:
    """The Hydra task of a shared-GPU sweep (hydra_plugins/resexp_launcher/): prepare only; bad input ends the sweep."""
    try:
        return prepare(cfg)
    except ResexpError as error:
        drop_unstarted(HydraConfig.get())
        fail(f"error: {error}")


def train_task(cfg: DictConfig) -> float:
    """The Hydra task of a single run, and of each run of a sweep under Hydra's basic launcher."""
    hydra_cfg = HydraConfig.get()
    job = prepare_task(cfg)
    try:
        with displays({"train": job.iterations}) as screens, stop_requests() as stops:
            return job.train(screens[0], stops, job.make_step())
    except ResexpError as error:
        drop_unstarted(hydra_cfg)
        fail(f"error: {error}")
    except Interrupted as stop:
        stopped(stop.signum, stop.iteration, hydra_cfg)
    except KeyboardInterrupt:
        fail(f"stopped at once; the last checkpoint in {job.run_dir}, if there is one, is intact", 128 + signal.SIGINT)


def one_line(error: Exception) -> str:
    """Hydra's and OmegaConf's messages span lines (key, full_key, object_type): keep the sentences."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("full_key:", "object_type", "reference_type"))]
    return " ".join(kept) or type(error).__name__


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
    if command == "report":
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
        return
    OmegaConf.register_new_resolver("resexp.net", net_name, replace=True)
    sys.argv = [f"resexp {command}", *rest]
    source = config_dir()
    config_path = str(source) if isinstance(source, Path) else "pkg://resexp.conf"
    # Hydra then raises its errors instead of printing a trimmed stack trace, and they are reported
    # below in one line; an unexpected error (a bug) still shows its whole traceback.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    # Hydra finds plugins by scanning the hydra_plugins namespace package, which editable installs
    # (setuptools >= 64) can hide: register resexp's launcher by hand.
    from hydra_plugins.resexp_launcher.shared_gpu_launcher import SharedGPULauncher

    Plugins.instance().register(SharedGPULauncher)
    try:
        check_choices([arg for arg in rest if "=" in arg and not arg.startswith("-")])
        hydra.main(version_base="1.3", config_path=config_path, config_name="train")(train_task)()
    except ResexpError as error:
        fail(f"error: {error}")
    except OSError as error:  # typically the run directory: not writable, not a directory, disk full
        where = f" {error.filename}" if error.filename else ""
        fail(
            f"error: cannot write{where} ({error.strerror or error}); choose a writable hydra.run.dir or hydra.sweep.dir"
        )
    except (HydraException, OmegaConfBaseException) as error:
        fail(f"error: {one_line(error)}")
