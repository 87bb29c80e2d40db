"""The config's own functions (OmegaConf resolvers in conf/): run names, and milestones that scale
with the run. Registered before any config is composed or a saved one is read back.

    ${resexp.run:OVERRIDES,MODEL,SHORTCUT}                   a lone run's directory: the net and what else
                                                              the command line sets (resnet56-A_seed1)
    ${resexp.net:MODEL,SHORTCUT}                             a net's name: resnet56-A, plain56,
                                                              resnet50-B-v1.5 (MODEL: the model node)
    ${resexp.sweep_run:SWEEP_DIR,OVERRIDES,MODEL,SHORTCUT,OLD_NAME}   a sweep run's: the net and what
                                                              the sweep varies besides (resnet56-A_seed3)
    ${resexp.at:ITERATIONS,FRACTION,...}                     milestones at these fractions of the run
    ${resexp.now:FORMAT}                                      Hydra's ${now:}, but under several processes
                                                              rank 0's start time on every rank, so that
                                                              they agree on one run directory
"""

from __future__ import annotations

import datetime
import inspect
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from resexp import distributed
from resexp.checkpoint import NOT_IDENTITY
from resexp.errors import ResexpError
from resexp.models import DEFAULT, NAME_KEYS, canonical_shortcut, model_name
from resexp.runs import CHECKPOINT, METRICS, swept_keys

# The keys a net's name already says (its depth, plain or residual, its bottleneck's stride, its units,
# widths, groups and dropout; the shortcut, for a residual net).
NAMED_BY_NET = {"model"} | {f"model.{key}" for key in NAME_KEYS if key not in ("block", "stem")}
SHORTCUT_KEYS = {"shortcut", "model.shortcut"}


def register() -> None:
    # OmegaConf 2.4 deprecates register_new_resolver for register_resolver, which in 2.3 is an older,
    # other function
    modern = "replace" in inspect.signature(OmegaConf.register_resolver).parameters
    register_resolver = OmegaConf.register_resolver if modern else OmegaConf.register_new_resolver
    register_resolver("resexp.net", run_name, replace=True)
    register_resolver("resexp.sweep_run", sweep_run_name, replace=True)
    register_resolver("resexp.run", lone_run_name, replace=True)
    register_resolver("resexp.at", at_fractions, replace=True)
    # cached as Hydra caches ${now:}: a sweep's runs, and submitit's jobs, which get a copy of the cache,
    # resolve the sweep's directory as it was first resolved
    register_resolver("resexp.now", now, replace=True, use_cache=True)


def now(pattern: str) -> str:
    return (distributed.STARTED or datetime.datetime.now()).strftime(pattern)


def run_name(model: Mapping[str, Any], shortcut: str) -> str:
    """The name of the net `model` (the config's model node) makes: resnet56-A, plain56, resnet50-B-v1.5.
    A shortcut that is no option is named as typed: the config check refuses it, and the directory is
    taken back."""
    depth = model["depth"]
    try:
        return model_name(model, canonical_shortcut(shortcut))
    except ResexpError:
        return f"{model.get('arch') or DEFAULT}{depth}-{shortcut}"


def sweep_run_name(
    sweep_dir: str, overrides: Sequence[str], model: Mapping[str, Any], shortcut: str, old_name: str = ""
) -> str:
    """A sweep run's directory: the net's name, then `_<key><value>` for each other key the sweep varies
    (`resnet56-A_seed3`, `plain20_lr0.01`), so that TensorBoard's run list shows each name whole and
    tells the runs apart. The same sweep command gives the same names: that is how it resumes. Where the
    sweep's record (multirun.yaml) cannot be read, every override of the run names it. A run that an
    older resexp named by all its overrides (`old_name`, Hydra's override_dirname) keeps its directory."""
    old = Path(sweep_dir) / old_name if old_name else None
    if old is not None and ((old / CHECKPOINT).exists() or (old / METRICS).exists()):
        return old_name
    given = given_values(overrides)
    varies = swept_keys(Path(sweep_dir))
    return named(model, shortcut, [key for key in (varies if varies is not None else given) if key in given], given)


def lone_run_name(overrides: Sequence[str], model: Mapping[str, Any], shortcut: str) -> str:
    """A lone run's directory, after its start time: the net, then `_<key><value>` for each key the command
    line sets that makes it another experiment (`resnet20-A_seed1`, `plain56_lr0.05`), as a sweep's runs
    are named; what changes only where or how it runs (device, resume, log_every: checkpoint.NOT_IDENTITY)
    and Hydra's own keys are left out."""
    return named(model, shortcut, set_keys(overrides), given_values(overrides))


def set_keys(overrides: Sequence[str]) -> list[str]:
    """The keys a lone run's command line sets that make it another experiment: not those that change only
    where or how it runs (checkpoint.NOT_IDENTITY), nor Hydra's own."""
    return [key for key in given_values(overrides) if key not in NOT_IDENTITY and not key.startswith("hydra")]


def given_values(overrides: Sequence[str]) -> dict[str, str]:
    """The overrides as key: value, `+` and `~` taken off the keys."""
    given = {}
    for override in overrides:
        key, _, value = override.partition("=")
        given[key.lstrip("+~")] = value
    return given


def named(model: Mapping[str, Any], shortcut: str, keys: Sequence[str], given: Mapping[str, str]) -> str:
    """The net's name and `_<key><value>` for each of `keys` it does not say already (its depth, its shortcut)."""
    said = NAMED_BY_NET | (SHORTCUT_KEYS if model["residual"] else set())
    rest = [key for key in keys if key not in said]
    leaves = [key.rsplit(".", 1)[-1] for key in rest]
    parts = [run_name(model, shortcut)]
    for key, leaf in zip(rest, leaves):
        name = leaf if leaves.count(leaf) == 1 else key  # lr, unless two varied keys end in lr
        value = re.sub(r"[^A-Za-z0-9.+-]", "", given[key].replace(",", "-")) or "none"
        parts.append(f"{name}{value}" if re.match(r"-?\d", value) else f"{name}-{value}")
    return "_".join(parts)


def at_fractions(iterations: int, *fractions: float) -> list[int]:
    """Milestones at these fractions of the run (the paper's CIFAR drops: 0.5 and 0.75 of 64k), so that a
    shorter run keeps the paper's shape; those that fall outside a very short run are left out."""
    points = [round(iterations * fraction) for fraction in fractions]
    return sorted({point for point in points if 0 < point < iterations})
