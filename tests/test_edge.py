"""The typed config edge (resexp/schemas.py, resexp/config.py): every key has a type that OmegaConf
enforces while Hydra composes, every number a range that config.py checks, and either kind of bad
value is one line on stderr, exit code 2, and no directory left behind."""

import typing

import pytest
from helpers import SHRINK, assert_one_line_error, compose_config, resexp
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from resexp import schemas
from resexp.config import flat

# Where each schema's fields live in the composed config, and a config choice that brings them in.
PLACES = [
    (schemas.TrainSchema, "", []),
    (schemas.ModelSchema, "model.", []),
    (schemas.SGDSchema, "optim.", []),
    (schemas.ScheduleSchema, "schedule.", []),
    (schemas.Cifar10Schema, "data.", ["data=cifar10"]),
    (schemas.ImageNetSchema, "data.", ["data=imagenet"]),
    (schemas.SyntheticSchema, "data.", ["data=synthetic"]),
]
WRONG = {int: "abc", float: "abc", bool: "maybe"}  # a value no key of the type takes


def typed_keys():
    """(key, the schema's type, the choices that bring the key in) for every key of a checked type."""
    for schema, prefix, choices in PLACES:
        for name, annotation in typing.get_type_hints(schema).items():
            base = [arg for arg in typing.get_args(annotation) if arg is not type(None)] or [annotation]
            if typing.get_origin(annotation) is list or base[0] in WRONG:
                yield pytest.param(prefix + name, annotation, choices, id=prefix + name + "".join(choices))


@pytest.mark.parametrize("key, annotation, choices", list(typed_keys()))
def test_a_value_of_the_wrong_type_is_refused_while_composing_naming_the_key_and_type(key, annotation, choices):
    wrong = "[abc]" if typing.get_origin(annotation) is list else WRONG.get(annotation, "abc")
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(*choices, f"{key}={wrong}")
    line = schemas.error_line(error.value)
    shown = f"{key}[0]='abc'" if typing.get_origin(annotation) is list else f"{key}={wrong!r}"
    wanted = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else annotation
    assert line == f"{shown} is not {schemas.type_name(wanted)}"


@pytest.mark.parametrize("data", ["cifar10", "imagenet", "synthetic"])
def test_every_key_of_the_yaml_files_has_a_schema_and_every_field_a_value(data):
    cfg = compose_config(f"data={data}")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # a field no YAML file sets raises
    for node in (cfg, cfg.model, cfg.optim, cfg.schedule, cfg.data):  # every group merged into its schema
        assert OmegaConf.get_type(node).__module__ == "resexp.schemas", node


# Numbers for which -1 is in range: the gates' initial bias is negative by design (its bad values are
# nan and inf, below).
NEGATIVE_IN_RANGE = {"model.gate_bias"}


def numeric_keys():
    """Every number of the composed config, with each data config (the launcher's are tested below)."""
    for data in ("cifar10", "imagenet", "synthetic"):
        for key, value in flat(compose_config(f"data={data}")).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in NEGATIVE_IN_RANGE:
                yield pytest.param(data, key, id=f"{key}-{data}")


@pytest.mark.parametrize("data, key", list(numeric_keys()))
def test_every_number_out_of_range_is_one_line_naming_it_and_nothing_is_left(tmp_path, data, key):
    run_dir = tmp_path / "run"
    result = resexp("train", *SHRINK, f"data={data}", f"{key}=-1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert_one_line_error(result, f"{key}=-1")
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["model.depth=abc"], "model.depth='abc' is not an integer"),
        (["seed=abc"], "seed='abc' is not an integer"),
        (["optim.lr=abc"], "optim.lr='abc' is not a number"),
        (["resume=maybe"], "resume='maybe' is not a boolean (true or false)"),
        (["cuda_graph=maybe"], "cuda_graph='maybe' is not a boolean (true or false)"),
        (["schedule.milestones=[1,x]"], "schedule.milestones[1]='x' is not an integer"),
        (["optim.lr=-0.1"], "optim.lr=-0.1 must be a positive, finite number"),
        (["optim.lr=nan"], "optim.lr=nan must be a positive, finite number"),
        (["optim.lr=inf"], "optim.lr=inf must be a positive, finite number"),  # trains nothing but infinities
        (["shortcut=gated", "model.gate_bias=nan"], "model.gate_bias=nan is not a number"),
        (["shortcut=gated", "model.gate_bias=-inf"], "model.gate_bias=-inf is not a number"),
        (["optim.momentum=-1"], "optim.momentum=-1.0 must be in [0, 1)"),
        (["optim.momentum=1"], "optim.momentum=1.0 must be in [0, 1)"),
        (["optim.weight_decay=-1e-4"], "optim.weight_decay=-0.0001 must be a finite number of 0 or more"),
        (["schedule.gamma=0"], "schedule.gamma=0.0 must be in (0, 1]"),
        (["data.test_size=0"], "data.test_size=0 must be a positive integer"),
        (["device=mps"], "device='mps' is not a device; choose auto, cpu, cuda or cuda:N"),
        (["optim._partial_=false"], "optim._partial_=False must be true"),
        (["data=imagenet", "data.crop=300"], "data.crop=300, data.test_size=256: need crop <= scale[0] <= scale[1]"),
        (["data=imagenet", "data.workers=-1"], "data.workers=-1 must be auto or a number of processes"),
        (["data=imagenet", "data.workers=many"], "data.workers='many' must be auto or a number of processes"),
        (["data=imagenet", "data.mean=[0.5,0.5]"], "data.mean=[0.5, 0.5] must be three values in [0, 1]"),
        (["schedule.batch_size=0"], "schedule.batch_size=0 must be a positive integer"),
        (["data.eval_batch_size=0"], "data.eval_batch_size=0 must be a positive integer"),
        (["-m", "seed=0,abc"], "seed='abc' is not an integer"),  # found by Hydra's sweeper, after it made the sweep
        (
            ["-m", "optim.lr=0.1,-1"],
            "optim.lr=-1.0 must be a positive, finite number",
        ),  # found by the second run: the first is taken back
        (["-m", "hydra.launcher.max_runs=abc", "seed=0,1"], "hydra.launcher.max_runs='abc' is not an integer"),
        (["-m", "hydra.launcher.max_runs=-1", "seed=0,1"], "hydra.launcher.max_runs=-1 must be a positive integer"),
        (["-m", "hydra.launcher.group_runs=maybe", "seed=0,1"], "hydra.launcher.group_runs='maybe' is not a boolean"),
        (["-m", "optim.lr=0.1,-1", "hydra/launcher=basic"], "optim.lr=-1.0 must be a positive, finite number"),
        # Hydra's missing-config error is also an OSError: not a run directory's fault
        (["-m", "hydra/launcher=nope"], "Could not find 'hydra/launcher/nope' Available options in 'hydra/launcher'"),
    ],
)
def test_bad_values_are_one_line_exit_2_and_leave_nothing_behind(tmp_path, arguments, message):
    flags, overrides = [a for a in arguments if a.startswith("-")], [a for a in arguments if not a.startswith("-")]
    result = resexp("train", *flags, *SHRINK, *overrides, cwd=tmp_path)  # the default directories under outputs/
    assert_one_line_error(result, message)
    if "hydra/launcher=basic" not in arguments:  # Hydra's basic launcher trains the first run before the second fails
        assert not (tmp_path / "outputs").exists(), sorted(tmp_path.rglob("*"))
