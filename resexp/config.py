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
import difflib
import functools
import importlib.resources
import inspect
import math
import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
import yaml
from hydra import initialize_config_dir, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resexp import checkpoint, distributed, record, resolvers, schemas
from resexp.checks import check_values, one_of
from resexp.data import Preprocessing, cifar10, cifar100, imagenet, imagenet_packed, synthetic
from resexp.errors import ResexpError
from resexp.files import read_bytes, why_not
from resexp.jobs import RunSettings
from resexp.models import Spec, spec_of
from resexp.runs import CHECKPOINT, HYDRA, Place, swept_keys
from resexp.saved import READ, SavedRun
from resexp.step import PRECISIONS
from resexp.train import Loop, Remedies, Schedule

# What a config's `_target_` may name: resexp's own builders, each with the schema of its keys. resexp never
# instantiates a config (Hydra's instantiate calls whatever `_target_` names, and recursively whatever its
# values name): it looks the target up here and calls the builder with the node's other keys, each a
# plain value. A saved config may come from anyone; the command line's own is checked the same way.
DATA_BUILDERS: dict[str, tuple[Callable[..., Any], type]] = {
    "resexp.data.cifar10": (cifar10, schemas.Cifar10Schema),
    "resexp.data.cifar100": (cifar100, schemas.Cifar10Schema),
    "resexp.data.imagenet": (imagenet, schemas.ImageNetSchema),
    "resexp.data.imagenet_packed": (imagenet_packed, schemas.PackedSchema),
    "resexp.data.synthetic": (synthetic, schemas.SyntheticSchema),
}
OPTIMIZERS: dict[str, tuple[Callable[..., Any], type]] = {"torch.optim.SGD": (torch.optim.SGD, schemas.SGDSchema)}
HYDRA_KEYS = ("_target_", "_partial_")  # Hydra's instantiate's, not the builder's


# The builders of CIFAR-kind images, which take conf/preprocess/'s centring and padding; ImageNet has §3.4's.
PREPROCESSED = {"resexp.data.cifar10", "resexp.data.cifar100", "resexp.data.synthetic"}


def data_builder(cfg: DictConfig) -> Callable[..., Any]:
    """The data's builder (builder), given the preprocessing of conf/preprocess/ where it takes one; one
    line where another than the paper's is asked of data that has its own (ImageNet's)."""
    data = builder(cfg, "data", DATA_BUILDERS)
    chosen = Preprocessing(cfg.preprocess.normalize, cfg.preprocess.pad)
    if cfg.data._target_ in PREPROCESSED:
        return functools.partial(data, preprocessing=chosen)
    if chosen != Preprocessing():
        raise ResexpError(
            f"preprocess.normalize={chosen.normalize}, preprocess.pad={chosen.pad} are for CIFAR-kind images; "
            f"data._target_={cfg.data._target_} has the paper's own preprocessing: use preprocess=paper"
        )
    return data


def is_plain(value: Any) -> bool:
    """None, a boolean, a number or a string, or a list of them: a value, never a node to build."""
    if isinstance(value, list):
        return all(is_plain(item) and not isinstance(item, list) for item in value)
    return value is None or isinstance(value, (bool, int, float, str))


def builder(cfg: DictConfig, group: str, builders: dict[str, tuple[Callable[..., Any], type]]) -> Callable[..., Any]:
    """The builder that the config's `group` node names (data or optim), given the node's plain values;
    the run passes the rest (the batch size and seed, or the parameters). One line for a target that is
    not resexp's, a key its schema lacks, or a value that is not plain."""
    values = OmegaConf.to_container(cfg[group], resolve=True)
    target = values.get("_target_")
    if target not in builders:
        raise ResexpError(f"{group}._target_={target!r} is not one of resexp's builders; choose {', '.join(builders)}")
    build, schema = builders[target]
    keys = {field.name for field in dataclasses.fields(schema)} - set(HYDRA_KEYS)
    for key, value in values.items():
        if key not in (*keys, *HYDRA_KEYS):
            raise ResexpError(f"{group}.{key} is no key of {target}; its keys are {', '.join(sorted(keys))}")
        if not is_plain(value):
            raise ResexpError(
                f"{group}.{key}={value!r} is not a value (a number, string or boolean, or a list of them)"
            )
    return functools.partial(build, **{key: value for key, value in values.items() if key not in HYDRA_KEYS})


# Hydra 1.3 wants the defaults it is to keep named (version_base="1.3"), and 1.4 deprecates the argument:
# its defaults are 1.3's. Hydra 1.4 also asks which targets a config may instantiate (its execution
# whitelist): resexp's Hydra config names these alone (conf/train.yaml's callback, the log handlers of
# conf/hydra/job_logging/), Hydra allows each launcher its own class, and resexp instantiates nothing itself.
HYDRA_14 = "execution_whitelist" in inspect.signature(hydra.main).parameters
VERSION_BASE = {} if HYDRA_14 else {"version_base": "1.3"}
TRUSTED_TARGETS = ["resexp.record.RunRecord", "resexp.logs.console_handler", "resexp.logs.RunLogFile"]
HYDRA_MAIN = {"execution_whitelist": TRUSTED_TARGETS} if HYDRA_14 else VERSION_BASE


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
        initialize_config_dir(config_dir=str(source), **VERSION_BASE)
        if isinstance(source, Path)
        else initialize_config_module("resexp.conf", **VERSION_BASE)
    ):
        return hydra.compose("train", overrides=list(overrides), return_hydra_config=hydra_node)


def check_overrides(overrides: list[str], keys: bool = True) -> None:
    """Name a bad config choice (`model=nope`) or a key no config has (`iterations=100`, `+modle=resnet20`)
    in one line, before Hydra prints its long report, or appends a typo that nothing reads."""
    root = config_dir()
    groups = {entry.name for entry in root.iterdir() if entry.is_dir() and entry.name not in ("hydra", "__pycache__")}
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # malformed overrides: Hydra's own parser error says more than we could
        return
    for override in parsed:
        group = override.key_or_group
        if override.package is not None or group.split(".")[0].split("/")[0] == "hydra":  # Hydra's own
            continue
        if group not in groups:
            if keys:
                check_key(group, sorted(groups))
            continue
        if override.is_delete():
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


def sweep_preset(overrides: list[str]) -> str | None:
    """Where the overrides choose an experiment preset that is a sweep (its hydra.sweeper.params), what to
    say of it to a command without -m: it names the runs and the command that trains them."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra's own parser says what is wrong
        return None
    chosen = [
        o.get_value_element_as_str() for o in parsed if o.key_or_group == "experiment" and not o.is_sweep_override()
    ]
    path = config_dir() / "experiment" / f"{chosen[-1]}.yaml" if chosen else None
    if path is None or not path.is_file():  # none, or not a preset: check_overrides names the choices
        return None
    params = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("sweeper", {}).get("params") or {}
    if not params:
        return None
    swept = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    runs = math.prod(len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1 for o in swept)
    return (
        f"experiment={chosen[-1]} is a sweep of {runs} runs ({', '.join(params)}); train them with -m: "
        f"resexp train -m experiment={chosen[-1]}"
    )


def check_key(key: str, groups: list[str]) -> None:
    """A key of the command line that some config has (schemas.known_keys: any data config's counts, which
    Hydra then checks against the chosen one), or a one-line error naming the closest real ones."""
    known = schemas.known_keys()
    if key in known or any(key.startswith(f"{whole}.") for whole, takes_keys in known.items() if takes_keys):
        return
    lasts = {whole: whole.rsplit(".", 1)[-1] for whole in known}
    last = key.rsplit(".", 1)[-1]
    near = [whole for whole, end in lasts.items() if end == last]  # iterations: schedule.iterations
    if not near:  # a typo: modle (model), iteration (schedule.iterations)
        near = difflib.get_close_matches(key, [*known, *groups], n=3, cutoff=0.75)
        close = set(difflib.get_close_matches(last, set(lasts.values()), n=3))
        near += [whole for whole, end in lasts.items() if end in close]
    guess = f"; did you mean {' or '.join(list(dict.fromkeys(near))[:3])}?" if near else ""
    raise ResexpError(f"{key} is no key of resexp's configs{guess} (`resexp train --cfg job` shows them all)")


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
        warmup_iterations=plan.warmup_iterations,
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
        return f"run the same sweep again with {shlex.quote(f'hydra.sweep.dir={hydra_cfg.sweep.dir}')}"
    return command(list(hydra_cfg.overrides.task), {}, [f"hydra.run.dir={hydra_cfg.runtime.output_dir}"])


def remedies(hydra_cfg: DictConfig, lr: float) -> Remedies:
    """The commands that a run gone non-finite advises, each one that works: skipping such steps in the
    same directory (on_nonfinite is no part of the run's identity), or a lower rate in a new one (the
    rate is)."""
    lower = f"{lr / 10:g}"
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return Remedies(
            skip="to skip such steps, run the same sweep again with on_nonfinite=skip "
            + shlex.quote(f"hydra.sweep.dir={hydra_cfg.sweep.dir}"),
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
    """What tells this run apart from others, with its values, other than its net: in a sweep the keys it
    varies (runs.swept_keys); alone, what its command line sets (resolvers.set_keys), as its directory's
    name says."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        keys = resolvers.set_keys(list(hydra_cfg.overrides.task))
    else:
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
    data = data_builder(cfg)
    if data.keywords.get("workers") == "auto":  # one decoding process per CPU core this process may use
        data = functools.partial(data, workers=cpu_cores())
    distributed.local_batch(cfg.schedule.batch_size)  # each process's share, or a one-line error
    if cfg.sync_bn and distributed.WORLD.size == 1:
        raise ResexpError(
            "sync_bn=true normalizes over the processes of torchrun (or SLURM's tasks), and this run has one; "
            "leave it false, or start the run with several processes"
        )
    # without sync_bn the BN statistics are over each process's share of the batch: another run for another N
    identity = checkpoint.identity({**values, "processes": distributed.WORLD.size})
    identity["shortcut"] = net.shortcut  # B and projection are one run
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
        data=data,
        optimizer=builder(cfg, "optim", OPTIMIZERS),
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
        notes=unused(hydra_cfg, net),
    )


def unused(hydra_cfg: DictConfig, net: Spec) -> tuple[str, ...]:
    """What the user's command line sets that this run's net does not use (a plain net's shortcut): said
    once, where a preset's or the default's value is not."""
    given = resolvers.given_values(list(hydra_cfg.overrides.task))
    shortcut = given.get("shortcut", given.get("model.shortcut"))
    if shortcut is None or net.residual:
        return ()
    return (f"{net.name} is a plain net: shortcut={shortcut} has no effect",)


# --- A finished or stopped run, made again from its directory (resexp eval, export, analyze)


def saved_overrides(path: Path) -> list[str]:
    """A run's record of its command line (.hydra/overrides.yaml) as data: a list of overrides, each of
    which sets a key, or chooses a config, that this conf/ has, to a plain value. A run directory may come
    from anyone, so an override that could do more is refused: one that adds or deletes keys (+, ++, ~:
    a node whose _target_ something might call), sets Hydra's own (hydra.searchpath would bring config
    groups of the directory's own), names a package (@), sweeps, interpolates (${oc.env:...} would read
    the reader's environment) or gives a dict."""
    try:
        loaded = yaml.safe_load(read_bytes(path))
    except OSError as error:
        raise ResexpError(f"{path} is {why_not(error)}") from None
    except yaml.YAMLError as error:
        raise ResexpError(f"{path} is not a list of overrides ({type(error).__name__})") from None
    if not isinstance(loaded, list) or not all(isinstance(item, str) for item in loaded):
        raise ResexpError(f"{path} is not a list of overrides (strings such as model=resnet20)")
    try:
        parsed = OverridesParser.create().parse_overrides(loaded)
    except HydraException as error:
        raise ResexpError(f"{path}: {schemas.error_line(error)}") from None
    for text, override in zip(loaded, parsed):
        key, value = override.key_or_group, override.value()
        refused = (
            "adds or deletes a key"
            if override.is_add() or override.is_force_add() or override.is_delete()
            else "sets Hydra's own config"
            if key == "hydra" or key.startswith(("hydra.", "hydra/"))
            else "names a package"
            if override.package is not None
            else "is a sweep"
            if override.is_sweep_override()
            else "interpolates"
            if "${" in str(value)
            else "gives a node, not a value"
            if not is_plain(value)
            else None
        )
        if refused:
            raise ResexpError(
                f"{path} holds {text!r}, which {refused}: resexp reads a saved run's overrides as data, and a run's "
                "own command line sets keys of resexp's configs to values"
            )
    try:
        # a config of this conf/'s, by its name: never a path to another file (its keys are an older resexp's)
        check_overrides(loaded, keys=False)
    except ResexpError as error:
        raise ResexpError(f"{path}: {error}") from None
    return loaded


def saved_run(run_dir: Path, data_root: str | None) -> SavedRun:
    """The run in `run_dir` as its saved overrides (.hydra/overrides.yaml, saved_overrides) compose it with
    this conf/, checked against its checkpoint's record of its net; `data_root` replaces the data's root.
    Nothing in the directory is instantiated or resolved: the data and the net are resexp's own builders
    given checked values."""
    checkpoint_path, overrides_path = run_dir / CHECKPOINT, run_dir / HYDRA / "overrides.yaml"
    for path in (checkpoint_path, overrides_path):
        if not path.is_file():
            raise ResexpError(f"{run_dir} is not a resexp run with a checkpoint: it has no {path.relative_to(run_dir)}")
    overrides = saved_overrides(overrides_path)
    try:
        cfg = compose(*overrides, *([f"data.root={data_root}"] if data_root is not None else []))
    except (HydraException, OmegaConfBaseException) as error:
        raise ResexpError(f"{overrides_path}: {schemas.error_line(error)}") from None
    try:
        data = data_builder(cfg)
        builder(cfg, "optim", OPTIMIZERS)
        check_values(flat(cfg))
        net = net_spec(cfg)
    except ResexpError as error:
        raise ResexpError(f"{overrides_path} makes no run of resexp's: {error}") from None
    recorded = checkpoint.load(checkpoint_path, layout=READ)["identity"]
    then = {**checkpoint.ADDED, **recorded}
    net = net.as_recorded(then)  # as it trained: its conf/ may predate a key its checkpoint recorded
    now = {**net.model_values(), "shortcut": net.shortcut, "data.num_classes": net.num_classes}
    recorded_now = checkpoint.identity({key: then.get(key) for key in now})
    if found := checkpoint.differences(recorded_now, checkpoint.identity(now)):
        raise ResexpError(
            f"{checkpoint_path} holds another net than {overrides_path} makes with this conf/ ({'; '.join(found)})"
        )
    return SavedRun(run_dir, net, data, cfg.schedule.batch_size, cfg.seed)
