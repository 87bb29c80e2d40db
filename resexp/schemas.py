"""The type of every config key, as dataclass schemas in Hydra's ConfigStore: each YAML file of conf/
names its schema first in its defaults list (`- /resexp_train@_here_`), so OmegaConf itself refuses a
value of the wrong type (`seed=abc`, `resume=maybe`) while Hydra composes the config, before any
directory exists. The values, and what each key is for, stay in the YAML files.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING
from omegaconf.errors import ValidationError

from resexp import models

# conf/model/: the keys every family has, then each family's own, typed and defaulted by its spec's
# fields (resexp/models/__init__.py)
ModelSchema = make_dataclass(
    "ModelSchema",
    [
        ("arch", str, field(default=models.DEFAULT)),  # the family (resexp.models.FAMILIES)
        ("depth", int, field(default=MISSING)),
        ("residual", bool, field(default=MISSING)),
        ("block", str, field(default=MISSING)),
        ("stem", str, field(default=MISSING)),
        ("shortcut", str, field(default=MISSING)),
        ("dropout", float, field(default=0.0)),  # a dropout rate, where each family's spec says; 0: none
        *((key, kind, field(default=default)) for key, (kind, default) in models.model_keys().items()),
    ],
)
ModelSchema.__module__ = __name__  # where OmegaConf resolves its fields' annotations


@dataclass
class SGDSchema:  # conf/optim/sgd.yaml
    _target_: str = MISSING
    _partial_: bool = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    nesterov: bool = False
    weight_decay: float = MISSING


@dataclass
class ScheduleSchema:  # conf/schedule/
    batch_size: int = MISSING
    iterations: int = MISSING
    milestones: list[int] = MISSING
    gamma: float = MISSING
    warmup_min_depth: int | None = MISSING
    warmup_lr: float = MISSING
    warmup_until_error: float = MISSING
    warmup_iterations: int | None = (
        None  # warm up for exactly these first iterations (He et al. 2016: 400); null: until the training error is below warmup_until_error (the 2015 paper)
    )


@dataclass
class DataSchema:  # what every data config has
    _target_: str = MISSING
    _partial_: bool = MISSING
    num_classes: int = MISSING
    eval_batch_size: int = MISSING


@dataclass
class Cifar10Schema(DataSchema):  # conf/data/cifar10.yaml
    root: str = MISSING
    download: bool = MISSING
    val_size: int = MISSING


@dataclass
class ImageNetRecipeSchema(DataSchema):  # what both ImageNet paths have: §3.4's augmentation
    root: str = MISSING
    scale: list[int] = MISSING
    crop: int = MISSING
    test_size: int = MISSING
    lighting_std: float = MISSING
    mean: list[float] = MISSING


@dataclass
class ImageNetSchema(ImageNetRecipeSchema):  # conf/data/imagenet.yaml
    workers: Any = MISSING  # auto or a number: OmegaConf 2.3 has no unions, so resexp/config.py tells
    decode: str = MISSING  # where the JPEGs are decoded: auto, gpu or cpu (resexp/checks.py)


@dataclass
class PackedSchema(ImageNetRecipeSchema):  # conf/data/imagenet_packed.yaml, imagenette.yaml
    size: int = MISSING
    placement: str = MISSING


@dataclass
class SyntheticSchema(DataSchema):  # conf/data/synthetic.yaml
    train_size: int = MISSING
    test_size: int = MISSING
    val_size: int = MISSING


@dataclass
class PreprocessSchema:  # conf/preprocess/
    normalize: str = MISSING
    pad: str = MISSING


@dataclass
class TrainSchema:  # conf/train.yaml
    data: Any = MISSING  # one of the data schemas, which each data config names itself
    preprocess: PreprocessSchema = MISSING
    optim: SGDSchema = MISSING
    schedule: ScheduleSchema = MISSING
    model: ModelSchema = MISSING
    shortcut: str = MISSING
    seed: int = MISSING
    device: str = MISSING
    precision: str = MISSING
    cuda_graph: bool = MISSING
    compile: bool = MISSING
    deterministic: bool = MISSING
    eval_points: int = MISSING
    log_every: int = MISSING
    grad_norms_every: int = MISSING
    checkpoint_every: int = MISSING
    resume: bool = MISSING
    on_nonfinite: str = MISSING
    sync_bn: bool = MISSING


@dataclass
class SharedGPULauncherSchema:  # conf/hydra/launcher/shared_gpu.yaml
    _target_: str = MISSING
    max_runs: int = MISSING
    group_runs: bool = MISSING


KEYS_OF = (TrainSchema, ModelSchema, SGDSchema, ScheduleSchema, Cifar10Schema, ImageNetSchema, PackedSchema)
KEYS_OF += (SyntheticSchema, PreprocessSchema)
KEYS_OF += (SharedGPULauncherSchema,)  # every schema whose fields a wrong-type error can name
SCHEMAS = {  # the names the YAML files' defaults lists give them
    "resexp_train": TrainSchema,
    "resexp_cifar10": Cifar10Schema,
    "resexp_cifar100": Cifar10Schema,  # the same keys
    "resexp_imagenet": ImageNetSchema,
    "resexp_imagenet_packed": PackedSchema,
    "resexp_synthetic": SyntheticSchema,
    "resexp_preprocess": PreprocessSchema,
    "resexp_shared_gpu_launcher": SharedGPULauncherSchema,
}


def register() -> None:
    """Put the schemas in Hydra's ConfigStore: before any config is composed, and again (the same ones)
    for each command of one process, which Hydra 1.4 asks to say is meant."""
    store = ConfigStore.instance().store
    again = {"replace": True} if "replace" in inspect.signature(store).parameters else {}  # Hydra 1.4's
    for name, schema in SCHEMAS.items():
        store(name=name, node=schema, provider="resexp", **again)


TYPE_NAMES = {  # a value of the type, and several
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    bool: ("a boolean (true or false)", "booleans"),
    str: ("a string", "strings"),
}


def type_name(annotation: Any) -> str:
    """How a schema field's type reads in a message: int -> "an integer", list[float] -> "a list of numbers"."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is list:
        return f"a list of {TYPE_NAMES[args[0]][1]}"
    if len(args) == 1:  # X | None
        return f"{type_name(args[0])} or null"
    return TYPE_NAMES.get(annotation, (str(annotation),))[0]


def fits(value: Any, annotation: Any) -> bool:
    """Whether `value`, read from a file as plain YAML or JSON, is of a schema field's type (`annotation`):
    how a saved config that may come from anyone is checked without OmegaConf resolving anything in it."""
    args = typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(fits(value, arg) for arg in args)
    if typing.get_origin(annotation) is list:
        return isinstance(value, list) and all(fits(item, args[0]) for item in value)
    if annotation in (int, float):  # a bool is no number here, an int is a float
        return isinstance(value, (int, float) if annotation is float else int) and not isinstance(value, bool)
    return isinstance(value, annotation)


@functools.cache
def known_keys() -> dict[str, bool]:
    """Every key of resexp's configs, dotted (`schedule.iterations`), and whether it takes keys of its own (a
    list's items, an open node's keys); a data key counts where any data config has it."""
    found: dict[str, bool] = {}

    def walk(schema: type, prefix: str) -> None:
        for name, kind in field_types(schema).items():
            nested = dataclasses.is_dataclass(kind)
            found[prefix + name] = not nested and typing.get_origin(kind) in (list, dict) or kind is Any
            if nested:
                walk(kind, f"{prefix}{name}.")

    walk(TrainSchema, "")
    for schema in {*SCHEMAS.values()} - {TrainSchema, PreprocessSchema, SharedGPULauncherSchema}:
        walk(schema, "data.")
    found["data"] = False  # a group: its options are configs, not keys
    return found


def field_types(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def error_line(error: BaseException) -> str:
    """Hydra's or OmegaConf's error as one line. A value of the wrong type names the key, the value and
    the type the key takes: `seed='abc' is not an integer`."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ValidationError):
        cause = cause.__cause__
    wanted = None
    if cause is not None and cause.object_type in KEYS_OF:  # a field of a schema
        wanted = typing.get_type_hints(cause.object_type).get(cause.full_key.rsplit(".", 1)[-1])
    elif cause is not None and cause.object_type is list and typing.get_args(cause.ref_type):  # an item of a list
        wanted = typing.get_args(cause.ref_type)[0]
    if wanted is not None:
        value = "null" if cause.value is None else repr(cause.value)
        return f"{cause.full_key}={value} is not {type_name(wanted)}"
    # Keep the sentences of a message that spans lines (key, full_key, object_type).
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(("full_key:", "object_type", "reference_type"))]
    if "Config search path:" in kept:  # a missing config: where Hydra looked is not what went wrong
        kept = kept[: kept.index("Config search path:")]
    return " ".join(kept) or type(error).__name__
