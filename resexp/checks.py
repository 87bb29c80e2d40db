"""The range of every config value: the checks that config.py runs once, on the flat config
(`schedule.iterations: 64000`), before any run is built. Each check names the key, the bad value and
what it may be, in one line."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from resexp import models
from resexp.errors import ResexpError


def positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or value < 1:
        raise ResexpError(f"{key}={value!r} must be a positive integer")


def non_negative_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or value < 0:
        raise ResexpError(f"{key}={value!r} must be an integer of 0 or more")


def positive(key: str, value: float) -> None:
    if not 0 < value < math.inf:  # nan and inf too: a rate of inf trains nothing but infinities
        raise ResexpError(f"{key}={value!r} must be a positive, finite number")


def non_negative(key: str, value: float) -> None:
    if not 0 <= value < math.inf:
        raise ResexpError(f"{key}={value!r} must be a finite number of 0 or more")


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
    "grad_norms_every": non_negative_int,
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
    "schedule.warmup_iterations": optional(positive_int),
    "schedule.warmup_until_error": interval(0, 100, low_open=True, high_open=False),
    "model.arch": one_of(*models.FAMILIES),  # each family checks its own keys as its spec is made
    "data._partial_": is_true,
    "data.num_classes": positive_int,
    "data.val_size": non_negative_int,
    "data.eval_batch_size": positive_int,
    "data.train_size": positive_int,
    "data.test_size": positive_int,
    "data.crop": positive_int,
    "data.lighting_std": non_negative,
    "data.size": positive_int,
    "data.placement": one_of("auto", "device", "host"),
    "data.decode": one_of("auto", "gpu", "cpu"),
    "preprocess.normalize": one_of("mean", "meanstd"),
    "preprocess.pad": one_of("zeros", "reflect"),
}


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
    if values.get("optim.nesterov") and values.get("optim.momentum") == 0:
        raise ResexpError("optim.nesterov=true needs momentum: optim.momentum=0; set it (0.9) or optim.nesterov=false")
    if "data.mean" in values and not (len(values["data.mean"]) == 3 and all(0 <= m <= 1 for m in values["data.mean"])):
        raise ResexpError(f"data.mean={values['data.mean']} must be three values in [0, 1], one per RGB channel")
