"""The edge where the Hydra config becomes typed settings. With cli.py, the only code that reads it.

Two layers of checks, so that nothing past this module meets a wrong value:
- types, by OmegaConf itself: resexp/schemas.py gives every key of conf/ its type, so `seed=abc` or
  `resume=maybe` is refused while Hydra composes the config, before any directory exists;
- values, by `check_values` (and the functions that make the net, the schedule and the device), once
  for every key: positive sizes and counts, a learning rate above zero, momentum in [0, 1), milestones
  inside the run, the options a choice has.
`settings` then turns the config into the frozen RunSettings a run is built from (resexp/jobs.py),
each value canonicalised once (the shortcut's letter A/B/C to its name).
"""

from __future__ import annotations

import importlib.resources
import math
import os
import re
import shlex
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import initialize_config_dir, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from resexp import schemas
from resexp.errors import ResexpError
from resexp.jobs import RunSettings
from resexp.models import NetSpec, canonical_shortcut
from resexp.models.resnet import net_name
from resexp.runs import Place, take_back_sweep
from resexp.step import PRECISIONS
from resexp.train import Loop, Schedule


def register() -> None:
    """The schemas (resexp/schemas.py) and the run-name resolver: before any config is composed."""
    schemas.register()
    OmegaConf.register_new_resolver("resexp.net", run_name, replace=True)


def config_dir() -> Path | importlib.resources.abc.Traversable:
    """conf/ of a source checkout (editable install or PYTHONPATH), else the installed package resexp.conf."""
    source = Path(__file__).resolve().parent.parent / "conf"
    return source if (source / "train.yaml").is_file() else importlib.resources.files("resexp.conf")


def compose(*overrides: str, hydra_node: bool = False) -> DictConfig:
    """The config that `resexp train OVERRIDES` runs (Hydra's runtime values, such as the run directory,
    aside): for scripts and tests. `hydra_node`: with Hydra's own config under `hydra`."""
    register()
    source = config_dir()
    with (
        initialize_config_dir(config_dir=str(source), version_base="1.3")
        if isinstance(source, Path)
        else initialize_config_module("resexp.conf", version_base="1.3")
    ):
        return hydra.compose("train", overrides=list(overrides), return_hydra_config=hydra_node)


def check_choices(overrides: list[str]) -> None:
    """Name a bad config choice (`model=nope`) in one line, before Hydra prints its long report."""
    root = config_dir()
    groups = {entry.name for entry in root.iterdir() if entry.is_dir() and entry.name not in ("hydra", "__pycache__")}
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # malformed overrides: Hydra's own parser error says more than we could
        return
    for override in parsed:
        group = override.key_or_group
        if group not in groups or override.is_delete() or override.package is not None:
            continue
        options = sorted(
            entry.name.removesuffix(".yaml") for entry in root.joinpath(group).iterdir() if entry.name.endswith(".yaml")
        )
        values = (
            list(override.sweep_string_iterator())
            if override.is_sweep_override()
            else [override.get_value_element_as_str()]
        )
        for value in values:
            if value not in options and value != "null":  # null: the group left out (experiment=null)
                raise ResexpError(
                    f"{group}={value!r} is not one of the {group} configs; choose one of {', '.join(options)}"
                )


def positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or value < 1:
        raise ResexpError(f"{key}={value!r} must be a positive integer")


def non_negative_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or value < 0:
        raise ResexpError(f"{key}={value!r} must be an integer of 0 or more")


def positive(key: str, value: float) -> None:
    if not value > 0:
        raise ResexpError(f"{key}={value!r} must be positive")


def non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ResexpError(f"{key}={value!r} must be 0 or more")


def interval(low: float, high: float, *, low_open: bool, high_open: bool) -> Callable[[str, float], None]:
    """A check that values lie between `low` and `high`, each end open (excluded) or closed."""
    span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(key: str, value: float) -> None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise ResexpError(f"{key}={value!r} must be in {span}")

    return check


def one_of(*options: str) -> Callable[[str, str], None]:
    listed = " or ".join(options) if len(options) == 2 else ", ".join(options)

    def check(key: str, value: str) -> None:
        if value not in options:
            raise ResexpError(f"{key}={value!r} is not an option; choose {listed}")

    return check


def is_true(key: str, value: bool) -> None:
    if value is not True:  # _partial_: the run itself passes the optimizer its parameters, the data its batch size
        raise ResexpError(f"{key}={value!r} must be true: the run passes the remaining arguments itself")


def optional(check: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
    return lambda key, value: value is None or check(key, value)


# Every key with a range, by its full name; booleans and strings without options need none, and the
# precision, the device, the shortcut, the depth and the milestones are checked as they are made below.
# The data keys are those of any data config.
CHECKS: dict[str, Callable[[str, Any], None]] = {
    "seed": interval(0, 2**32, low_open=False, high_open=True),  # ImageNet's epoch seeds multiply it: 32 bits
    "on_nonfinite": one_of("stop", "skip"),
    "eval_points": positive_int,
    "log_every": positive_int,
    "checkpoint_every": positive_int,
    "optim._partial_": is_true,
    "optim.lr": positive,
    "optim.momentum": interval(0, 1, low_open=False, high_open=True),
    "optim.weight_decay": non_negative,
    "schedule.batch_size": positive_int,
    "schedule.iterations": positive_int,
    "schedule.gamma": interval(0, 1, low_open=True, high_open=False),  # the rate falls at a milestone, or stays
    "schedule.warmup_min_depth": optional(positive_int),
    "schedule.warmup_lr": positive,
    "schedule.warmup_until_error": interval(0, 100, low_open=True, high_open=False),
    "data._partial_": is_true,
    "data.num_classes": positive_int,
    "data.val_size": non_negative_int,
    "data.eval_batch_size": positive_int,
    "data.train_size": positive_int,
    "data.test_size": positive_int,
    "data.crop": positive_int,
    "data.lighting_std": non_negative,
}


def flat(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as `a.b: value` pairs."""
    pairs: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                pairs[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return pairs


def check_values(values: dict[str, Any]) -> None:
    """Every value of the flat config in range (CHECKS, and ImageNet's sizes), or one line naming the
    first that is not and what it may be. The net, the schedule and the device check their own as they
    are made."""
    for key, value in values.items():
        if key in CHECKS:
            CHECKS[key](key, value)
    if "data.workers" in values and values["data.workers"] != "auto":
        workers = values["data.workers"]
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise ResexpError(
                f"data.workers={workers!r} must be auto or a number of processes (0: decode in the training process)"
            )
    if "data.scale" in values:  # ImageNet: the crops come from the resized images (§3.4)
        scale, crop, test = values["data.scale"], values["data.crop"], values["data.test_size"]
        if not (len(scale) == 2 and crop <= scale[0] <= scale[1] and crop <= test):
            raise ResexpError(
                f"data.scale={list(scale)}, data.crop={crop}, data.test_size={test}: "
                "need crop <= scale[0] <= scale[1] and crop <= test_size"
            )
    if "data.mean" in values and not (len(values["data.mean"]) == 3 and all(0 <= m <= 1 for m in values["data.mean"])):
        raise ResexpError(f"data.mean={values['data.mean']} must be three values in [0, 1], one per RGB channel")


# --- Settings


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ResexpError(f"device={name!r} is not a device; choose auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ResexpError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ResexpError(f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return device


def pick_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on CUDA (the tensor cores' fast format, and no loss scaling needed), fp32 elsewhere."""
    one_of("auto", *PRECISIONS)("precision", name)
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return name


def net_spec(cfg: DictConfig) -> NetSpec:
    """The net the config names, with its shortcut option as a name (B -> projection)."""
    model = cfg.model
    shortcut = canonical_shortcut(cfg.shortcut)
    return NetSpec(model.depth, model.residual, model.block, model.stem, shortcut, cfg.data.num_classes)


def run_name(residual: bool, depth: int, shortcut: str) -> str:
    """The net's name in the default run directory (conf/train.yaml's `resexp.net` resolver). A shortcut
    that is no option is named as typed: `settings` refuses it, and the directory is taken back."""
    try:
        return net_name(residual, depth, canonical_shortcut(shortcut))
    except ResexpError:
        return f"resnet{depth}-{shortcut}"


def schedule(cfg: DictConfig) -> Schedule:
    plan = cfg.schedule
    iterations, milestones = plan.iterations, tuple(plan.milestones)
    if list(milestones) != sorted(milestones) or any(not 0 < m < iterations for m in milestones):
        raise ResexpError(
            f"schedule.milestones={list(milestones)} must be increasing iterations within the run's "
            f"{iterations} (the paper drops the rate at 50% and 75% of the run)"
        )
    warmup = plan.warmup_min_depth is not None and cfg.model.depth >= plan.warmup_min_depth
    return Schedule(
        iterations=iterations,
        milestones=milestones,
        gamma=plan.gamma,
        # §4.2: only the deepest CIFAR nets (110 layers and up) start at the low warm-up rate.
        warmup_lr=plan.warmup_lr if warmup else None,
        warmup_until_error=plan.warmup_until_error,
    )


def user_chose_directory(hydra_cfg: DictConfig) -> bool:
    """Whether the command line set hydra.run.dir or hydra.sweep.dir (else they are outputs/'s defaults)."""
    chosen = {override.split("=", 1)[0].lstrip("+~") for override in hydra_cfg.overrides.hydra}
    return bool({"hydra.run.dir", "hydra.sweep.dir"} & chosen)


def place(hydra_cfg: DictConfig) -> Place:
    """Where Hydra put the run (in a sweep, or alone), and whether the user chose it."""
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    return Place(
        run_dir=Path(hydra_cfg.runtime.output_dir),
        in_sweep=sweep,
        chosen=user_chose_directory(hydra_cfg),
    )


def resume_command(hydra_cfg: DictConfig) -> str:
    """What continues this run: the same command on the same directory."""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f"run the same sweep again with hydra.sweep.dir={hydra_cfg.sweep.dir}"
    arguments = [*hydra_cfg.overrides.task, f"hydra.run.dir={hydra_cfg.runtime.output_dir}"]
    return " ".join(["resexp train", *map(shlex.quote, arguments)])


def cpu_cores() -> int:
    """The CPU cores this process may use (its affinity, where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def settings(cfg: DictConfig, hydra_cfg: DictConfig, where: Place) -> RunSettings:
    """The run that the composed config describes, every value checked; it writes to `where`."""
    values = flat(cfg)
    check_values(values)
    net, plan, device = net_spec(cfg), schedule(cfg), pick_device(cfg.device)
    data = cfg.data
    if data.get("workers") == "auto":  # one decoding process per CPU core this process may use
        data = OmegaConf.merge(data, {"workers": cpu_cores()})
    runtime_keys = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    identity = {key: value for key, value in values.items() if key not in runtime_keys}
    identity["shortcut"] = net.shortcut  # B and projection are one run
    loop = Loop(
        schedule=plan,
        base_lr=cfg.optim.lr,
        eval_every=math.ceil(plan.iterations / cfg.eval_points),
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        on_nonfinite=cfg.on_nonfinite,
        precision=pick_precision(cfg.precision, device),
    )
    return RunSettings(
        place=where,
        net=net,
        data=instantiate(data),
        optimizer=instantiate(cfg.optim),
        loop=loop,
        batch_size=cfg.schedule.batch_size,
        seed=cfg.seed,
        device=device,
        cuda_graph=cfg.cuda_graph,
        compile=cfg.compile,
        resume=cfg.resume,
        identity=identity,
        model_config=hydra_cfg.runtime.choices.get("model"),
        data_config=hydra_cfg.runtime.choices.get("data"),
        resume_command=resume_command(hydra_cfg),
    )


# The sweep directories Hydra made in this process, and whether the user chose them.
SWEEPS: list[tuple[Path, bool]] = []


class SweepRecord(Callback):
    """A Hydra callback (conf/train.yaml, hydra.callbacks) that notes each sweep's directory as the sweep
    starts: Hydra's sweeper makes it, then composes the runs' configs, so a sweep value of the wrong type
    ends the sweep before any run, or this code, could take the directory back; `take_back_sweeps` does."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SWEEPS.append((Path(config.hydra.sweep.dir), user_chose_directory(config.hydra)))


@contextmanager
def sweeps_taken_back() -> Iterator[None]:
    """A command that fails (bad input, mostly) leaves no sweep directory without a run, nor the default
    folders around it empty."""
    SWEEPS.clear()
    try:
        yield
    except BaseException:
        while SWEEPS:
            take_back_sweep(*SWEEPS.pop())
        raise
