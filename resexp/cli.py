"""`resexp SUBCOMMAND ...`: the entry point, and the one place that reads the Hydra config.

`resexp train [overrides]` is a real Hydra app (multirun, --cfg, --help, hydra.run.dir all work): the
dispatcher takes the subcommand off sys.argv and hands the rest to a @hydra.main function.
"""

from __future__ import annotations

import importlib.resources
import math
import platform
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import resexp
from resexp.errors import ResexpError
from resexp.logs import log, write_json
from resexp.models import build_model, canonical_shortcut, count_parameters
from resexp.models.resnet import net_name
from resexp.train import Schedule, train

COMMANDS = {"train": "train a plain or residual net (a Hydra app: `resexp train --help`, `resexp train -m ...`)"}
USAGE = "usage: resexp {" + ",".join(COMMANDS) + "} [args]\n\ncommands:\n" + "".join(
    f"  {name:8s}{text}\n" for name, text in COMMANDS.items()
)


def config_dir() -> Path | importlib.resources.abc.Traversable:
    """conf/ of a source checkout (editable install or PYTHONPATH), else the installed package resexp.conf."""
    source = Path(__file__).resolve().parent.parent / "conf"
    return source if (source / "train.yaml").is_file() else importlib.resources.files("resexp.conf")


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
        options = sorted(entry.name.removesuffix(".yaml") for entry in root.joinpath(group).iterdir() if entry.name.endswith(".yaml"))
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        for value in values:
            if value not in options:
                raise ResexpError(f"{group}={value!r} is not a {group} config; choose one of {', '.join(options)}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ResexpError(f"device={name!r} is not a device; choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ResexpError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
    return device


def positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ResexpError(f"{name}={value!r} must be a positive integer")
    return value


def make_model(cfg: DictConfig) -> tuple[torch.nn.Module, str]:
    """The net the config names, and its run name (`resnet56-A`, `plain56`)."""
    model, shortcut = cfg.model, canonical_shortcut(cfg.shortcut)
    net = build_model(model.depth, model.residual, model.block, model.stem, shortcut, cfg.data.num_classes)
    return net, net_name(model.residual, model.depth, shortcut)


def make_schedule(cfg: DictConfig) -> Schedule:
    schedule = cfg.schedule
    milestones = tuple(schedule.milestones)
    if list(milestones) != sorted(milestones):
        raise ResexpError(f"schedule.milestones={list(milestones)} must be increasing iteration numbers")
    return Schedule(
        iterations=positive("schedule.iterations", schedule.iterations),
        milestones=milestones,
        gamma=schedule.gamma,
        # §4.2: only the deepest nets (110 layers and up) start at the low warm-up rate.
        warmup_lr=schedule.warmup_lr if cfg.model.depth >= schedule.warmup_min_depth else None,
        warmup_until_error=schedule.warmup_until_error,
    )


def run(cfg: DictConfig) -> float:
    """Build everything the config names, train, and write metrics.json; returns the final test error."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    schedule = make_schedule(cfg)
    batch_size = positive("schedule.batch_size", cfg.schedule.batch_size)
    device = pick_device(cfg.device)
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once

    torch.manual_seed(cfg.seed)  # weight initialisation; the data loaders take the seed themselves
    model, name = make_model(cfg)
    model.to(device, memory_format=torch.channels_last)  # the layout to_device gives the images
    if not cfg.model.residual:
        log.info("%s is a plain net: shortcut=%s has no effect", name, cfg.shortcut)
    data = instantiate(cfg.data)(batch_size=batch_size, seed=cfg.seed)
    optimizer = instantiate(cfg.optim)(model.parameters())
    params = count_parameters(model)
    log.info("%s: %s parameters, %d iterations at batch %d on %s -> %s", name, f"{params:,}", schedule.iterations, batch_size, device, run_dir)

    summary = train(
        model,
        optimizer,
        data,
        schedule,
        device=device,
        run_dir=run_dir,
        eval_every=math.ceil(schedule.iterations / positive("eval_points", cfg.eval_points)),
        log_every=positive("log_every", cfg.log_every),
    )
    write_json(
        run_dir / "metrics.json",
        {
            "net": name,
            "model": hydra_cfg.runtime.choices.get("model"),
            "data": hydra_cfg.runtime.choices.get("data"),
            "depth": cfg.model.depth,
            "residual": cfg.model.residual,
            "shortcut": canonical_shortcut(cfg.shortcut) if cfg.model.residual else None,  # plain nets have none
            "params": params,
            "iterations": schedule.iterations,
            "batch_size": batch_size,
            "seed": cfg.seed,
            "images_per_s": schedule.iterations * batch_size / summary["train_time_s"],
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "resexp": resexp.__version__,
            **summary,
        },
    )
    final = summary["final"]
    log.info("done: train err %.2f%%  test err %.2f%%  -> %s", final["error/train"], final["error/test"], run_dir / "metrics.json")
    return final["error/test"]


def train_task(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except ResexpError as error:
        print(f"resexp: error: {error}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"resexp: error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    try:
        check_choices([arg for arg in rest if "=" in arg and not arg.startswith("-")])
    except ResexpError as error:
        print(f"resexp: error: {error}", file=sys.stderr)
        sys.exit(2)
    OmegaConf.register_new_resolver("resexp.net", net_name, replace=True)
    sys.argv = [f"resexp {command}", *rest]
    source = config_dir()
    config_path = str(source) if isinstance(source, Path) else "pkg://resexp.conf"
    hydra.main(version_base="1.3", config_path=config_path, config_name="train")(train_task)()
