"""The edge where the Hydra config becomes typed settings. With cli.py, the only code that reads it.

Two layers of checks, so that nothing past this module meets a wrong value:
- types, by OmegaConf itself: resexp/schemas.py gives every key of conf/ its type, so `seed=abc` or
  `resume=maybe` is refused while Hydra composes the config, before any directory exists;
- values, by `check_values` (resexp/checks.py) and the functions below that make the net, the schedule
  and the device, once for every key: positive sizes and counts, a learning rate above zero, momentum
  in [0, 1), milestones inside the run, the options a choice has.
`settings` then turns the config into the frozen RunSettings a run is built from (resexp/jobs.py),
each value canonicalised once (the shortcut's letter A/B/C to its name); `saved_run` makes a trained
run's net and data again from its directory, for `resexp eval` and `resexp export`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from hydra import initialize_config_dir, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resexp import checkpoint, distributed, record, resolvers, schemas
from resexp.checks import check_values, one_of
from resexp.errors import ResexpError
from resexp.evaluate import READ, SavedRun
from resexp.jobs import RunSettings
from resexp.models import NetSpec, Spec, spec_of
from resexp.runs import CHECKPOINT, HYDRA, Place, swept_keys
from resexp.step import PRECISIONS
from resexp.train import Loop, Remedies, Schedule


def register() -> None:
    """The schemas (resexp/schemas.py) and the config's resolvers (resexp/resolvers.py): before any
    config is composed."""
    schemas.register()
    resolvers.register()


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


# --- Settings


def pick_device(name: str) -> torch.device:
    """The device `name` says; under several processes, this process's (distributed.device)."""
    if (mine := distributed.device(name)) is not None:
        return mine
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


def net_spec(cfg: DictConfig) -> Spec:
    """The net the config names, with its shortcut option as a name (B -> projection)."""
    return spec_of(cfg.model, cfg.shortcut, cfg.data.num_classes)


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


def place(hydra_cfg: DictConfig) -> Place:
    """Where Hydra put the run (in a sweep, or alone), and whether the user chose it."""
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    run_dir = Path(hydra_cfg.runtime.output_dir)
    return Place(
        run_dir=run_dir,
        in_sweep=sweep,
        chosen=record.user_chose_directory(hydra_cfg),
        before=record.HELD.get(run_dir.absolute()),
    )


def command(task: list[str], changes: dict[str, str], extra: list[str]) -> str:
    """`resexp train` with the overrides `task`, the keys of `changes` set to their values, and `extra`."""
    kept = [item for item in task if item.split("=", 1)[0].lstrip("+~") not in changes]
    arguments = [*kept, *(f"{key}={value}" for key, value in changes.items()), *extra]
    return " ".join([distributed.command(), *map(shlex.quote, arguments)])


def resume_command(hydra_cfg: DictConfig) -> str:
    """What continues this run: the same command on the same directory."""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return f"run the same sweep again with hydra.sweep.dir={hydra_cfg.sweep.dir}"
    return command(list(hydra_cfg.overrides.task), {}, [f"hydra.run.dir={hydra_cfg.runtime.output_dir}"])


def remedies(hydra_cfg: DictConfig, lr: float) -> Remedies:
    """The commands that a run gone non-finite advises, each one that works: skipping such steps in the
    same directory (on_nonfinite is no part of the run's identity), or a lower rate in a new one (the
    rate is)."""
    lower = f"{lr / 10:g}"
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return Remedies(
            skip=f"to skip such steps, run the same sweep again with on_nonfinite=skip hydra.sweep.dir={hydra_cfg.sweep.dir}",
            lower_rate=f"to start over at a lower rate, run the sweep with optim.lr={lower} in another hydra.sweep.dir",
        )
    task, run_dir = list(hydra_cfg.overrides.task), hydra_cfg.runtime.output_dir
    # beside the directory the user chose, else in a new default one
    elsewhere = [f"hydra.run.dir={run_dir}_lr{lower}"] if record.user_chose_directory(hydra_cfg) else []
    return Remedies(
        skip=f"to skip such steps, in this directory: {command(task, {'on_nonfinite': 'skip'}, [f'hydra.run.dir={run_dir}'])}",
        lower_rate=f"to start over at a tenth of the rate: {command(task, {'optim.lr': lower}, elsewhere)}",
    )


def sweep_values(hydra_cfg: DictConfig, values: dict[str, Any]) -> dict[str, Any]:
    """In a sweep, the keys it varies (runs.swept_keys) other than the net's, with this run's values."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    keys = swept_keys(Path(hydra_cfg.sweep.dir)) or []
    chosen = hydra_cfg.runtime.choices
    picked = {key: values[key] if key in values else chosen.get(key) for key in keys}
    return {key: value for key, value in picked.items() if key not in resolvers.NAMED_BY_NET and value is not None}


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
    distributed.local_batch(cfg.schedule.batch_size)  # each process's share, or a one-line error
    identity = checkpoint.identity(values)
    identity["shortcut"] = net.shortcut  # B and projection are one run
    # without sync_bn the BN statistics are over each process's share of the batch: another run for another N
    identity["processes"] = distributed.WORLD.size
    loop = Loop(
        schedule=plan,
        base_lr=cfg.optim.lr,
        eval_every=math.ceil(plan.iterations / cfg.eval_points),
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        on_nonfinite=cfg.on_nonfinite,
        precision=pick_precision(cfg.precision, device),
        grad_norms_every=cfg.grad_norms_every,
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
        deterministic=cfg.deterministic,
        resume=cfg.resume,
        sync_bn=cfg.sync_bn,
        identity=identity,
        model_config=hydra_cfg.runtime.choices.get("model"),
        data_config=hydra_cfg.runtime.choices.get("data"),
        resume_command=resume_command(hydra_cfg),
        remedies=remedies(hydra_cfg, cfg.optim.lr),
        varies=sweep_values(hydra_cfg, values),
    )


# --- A finished or stopped run, made again from its directory (resexp eval, resexp export)

# The builders a run's data and optimizer may name: a saved config names one of these or is refused,
# since `instantiate` calls what `_target_` names and a run directory may come from anyone.
TARGETS = {
    "resexp.data.cifar10",
    "resexp.data.cifar100",
    "resexp.data.imagenet",
    "resexp.data.synthetic",
    "torch.optim.SGD",
}


def saved_run(run_dir: Path, data_root: str | None) -> SavedRun:
    """The run in `run_dir` as its saved overrides (.hydra/overrides.yaml) compose it with this conf/,
    checked against its checkpoint's record of its net; `data_root` replaces the data's root."""
    checkpoint_path, overrides_path = run_dir / CHECKPOINT, run_dir / HYDRA / "overrides.yaml"
    for path in (checkpoint_path, overrides_path):
        if not path.is_file():
            raise ResexpError(f"{run_dir} is not a resexp run with a checkpoint: it has no {path.relative_to(run_dir)}")
    try:
        overrides = [str(item) for item in yaml.safe_load(overrides_path.read_text()) or []]
    except (yaml.YAMLError, TypeError) as error:
        raise ResexpError(f"{overrides_path} is not a list of overrides ({type(error).__name__})") from None
    try:
        cfg = compose(*overrides, *([f"data.root={data_root}"] if data_root is not None else []))
    except (HydraException, OmegaConfBaseException) as error:
        raise ResexpError(f"{overrides_path}: {schemas.error_line(error)}") from None
    for target in (cfg.data._target_, cfg.optim._target_):
        if target not in TARGETS:
            raise ResexpError(
                f"{overrides_path} names _target_={target!r}; resexp builds only {', '.join(sorted(TARGETS))}"
            )
    check_values(flat(cfg))
    recorded = checkpoint.load(checkpoint_path, layout=READ)["identity"]
    net = net_spec(cfg)
    if isinstance(net, NetSpec):  # the stride its bottlenecks were trained with (its conf/ may predate the key)
        stride = {**checkpoint.ADDED, **recorded}["model.bottleneck_stride"]
        net = dataclasses.replace(net, bottleneck_stride=stride)
    now = {**net.model_values(), "shortcut": net.shortcut, "data.num_classes": net.num_classes}
    if found := checkpoint.differences({key: {**checkpoint.ADDED, **recorded}.get(key) for key in now}, now):
        raise ResexpError(
            f"{checkpoint_path} holds another net than {overrides_path} makes with this conf/ ({'; '.join(found)})"
        )
    return SavedRun(run_dir, net, instantiate(cfg.data), cfg.schedule.batch_size, cfg.seed)
