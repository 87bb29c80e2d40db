"""The edge where the Hydra config becomes plain, checked values: the net, the schedule, the device.
Bad values stop here with one line that names them and the valid ones."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from resexp.errors import ResexpError
from resexp.models import build_model, canonical_shortcut
from resexp.models.resnet import net_name
from resexp.step import PRECISIONS
from resexp.train import Schedule


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


def pick_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on CUDA (the tensor cores' fast format, and no loss scaling needed), fp32 elsewhere."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise ResexpError(f"precision={name!r} is not an option; choose auto, {', '.join(PRECISIONS)}")
    return name


def pick_on_nonfinite(name: str) -> str:
    if name not in ("stop", "skip"):
        raise ResexpError(f"on_nonfinite={name!r} is not an option; choose stop or skip")
    return name


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
    iterations = positive("schedule.iterations", schedule.iterations)
    if list(milestones) != sorted(milestones) or any(not 0 < m < iterations for m in milestones):
        raise ResexpError(
            f"schedule.milestones={list(milestones)} must be increasing iterations within the run's "
            f"{iterations} (the paper drops the rate at 50% and 75% of the run)"
        )
    return Schedule(
        iterations=iterations,
        milestones=milestones,
        gamma=schedule.gamma,
        # §4.2: only the deepest CIFAR nets (110 layers and up) start at the low warm-up rate.
        warmup_lr=schedule.warmup_lr
        if schedule.warmup_min_depth is not None and cfg.model.depth >= schedule.warmup_min_depth
        else None,
        warmup_until_error=schedule.warmup_until_error,
    )


def experiment_of(cfg: DictConfig, runtime_keys: list[str]) -> dict[str, Any]:
    """The resolved config as flat `a.b: value` pairs, minus the keys that do not change the experiment
    (where the data lives, the device, checkpointing): what a checkpoint must match to be resumed."""
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    flat["shortcut"] = canonical_shortcut(cfg.shortcut)  # B and projection are one experiment
    return {key: value for key, value in flat.items() if key not in runtime_keys}
