"""A run directory, the one place that knows its layout: what Hydra puts there, what resexp writes there
(checkpoint.pt, metrics.json, TensorBoard events, train.log), and how a run is read back from it, finished
or not. The training writes through this module, and `resexp report`, its figures and resume read
through it.

    <run dir>/.hydra/{config,hydra,overrides}.yaml   Hydra's record of the run's config
    <run dir>/train.log                              its log lines
    <run dir>/events.out.tfevents.*                  its TensorBoard curves (EVENTS)
    <run dir>/checkpoint.pt                          its latest checkpoint (resexp/checkpoint.py)
    <run dir>/metrics.json                           written once, when it finishes: Metrics below
    <run dir>/.resexp.lock                           while a process trains there: who (resexp/lock.py)
    <sweep dir>/multirun.yaml                        Hydra's record of a sweep, beside its runs
    <sweep dir>/.resexp.lock                         while a process runs the sweep
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resexp import checkpoint, models, schemas
from resexp.data.loaders import NORMALIZATIONS, PADS
from resexp.errors import ResexpError, first_line
from resexp.files import atomic_write, atomic_write_text, open_regular, read_bytes, read_text, why_not
from resexp.models import NAME_KEYS, SHORTCUTS, canonical_shortcut, model_name
from resexp.tags import TEST_ERROR, TRAIN_ERROR, VAL_ERROR

HYDRA = ".hydra"  # Hydra's saved config (hydra.output_subdir)
LOG = "train.log"  # ${hydra.job.name}.log (conf/hydra/job_logging/rich.yaml)
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
SWEEP_RECORD = "multirun.yaml"  # what Hydra writes into a sweep directory before its runs
LOCK = ".resexp.lock"  # the advisory lock of a run or sweep directory (resexp/lock.py)
EVENTS = "events.out.tfevents."  # TensorBoard's event files: EVENTS + the second each was opened + host, pid
CURVES = (TRAIN_ERROR, TEST_ERROR, VAL_ERROR)  # what a report draws


@dataclass
class Metrics:
    """metrics.json: what the run is (also TensorBoard's HPARAMS) and what it reached."""

    net: str = MISSING  # resnet56-A, plain56 (resexp.models.resnet.net_name)
    model: str | None = MISSING  # the model config's name (resnet56), None outside a Hydra run
    data: str = MISSING  # the data config's name: cifar10, imagenet, synthetic
    depth: int = MISSING
    residual: bool = MISSING
    shortcut: str | None = MISSING  # identity, projection, full or gated; None: a plain net or a DenseNet
    params: int = MISSING
    iterations: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING  # the base learning rate
    seed: int = MISSING
    precision: str = MISSING  # fp32 or bf16
    images_per_s: float = MISSING  # training images per second of training time
    device: str = MISSING  # the GPU's name, or cpu
    processes: int = 1  # that trained it together (torchrun), each on such a device; 1 before resexp 0.3
    torch: str = MISSING  # versions it ran with
    python: str = MISSING
    resexp: str = MISSING
    final: dict[str, float] = MISSING  # the last value of every logged metric: error/test, loss/train, ...
    best: dict[str, float] = (
        MISSING  # lowest errors (error/test, error/train at its log points) and their iterations (iteration/test)
    )
    skipped_steps: int = MISSING  # steps skipped for a non-finite loss (on_nonfinite=skip)
    train_time_s: float = MISSING  # seconds in training steps, evaluation excluded
    wall_time_s: float = MISSING  # seconds of the whole run, over all its sessions
    # the net as its family's spec makes it: `model.key: value` (Spec.model_values), the shortcut option and
    # the classes; None before 0.9.0, whose runs' nets are read from their saved config
    spec: dict[str, Any] | None = None


def write_metrics(run_dir: Path, metrics: Metrics) -> None:
    """Write metrics.json atomically: a reader, or a crash, sees no file or the whole of it."""
    text = json.dumps(dataclasses.asdict(metrics), indent=2, sort_keys=True) + "\n"
    atomic_write_text(run_dir / METRICS, text)


def read_metrics(run_dir: Path) -> Metrics:
    """metrics.json as Metrics, every field present and of its type, or a one-line error saying what is
    wrong, and how to write it again where the run's last checkpoint can."""
    try:
        return parse_metrics(read_text(run_dir / METRICS))
    except OSError as error:
        raise ResexpError(f"{run_dir / METRICS} is {why_not(error)}; move it away, or use another directory") from None
    except ValueError as error:
        again = (
            "; move it away and run the same command: the run's final checkpoint writes it again"
            if (run_dir / CHECKPOINT).is_file()
            else ""
        )
        raise ResexpError(f"{run_dir / METRICS} is truncated or malformed ({error}){again}") from None


def parse_metrics(text: str) -> Metrics:
    """The text of a metrics.json as Metrics; a ValueError saying in one line what is wrong with it."""
    try:
        loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise ValueError(f"it holds a {type(loaded).__name__}, not an object")
        metrics = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Metrics), loaded))
    except (ValueError, OmegaConfBaseException) as error:
        reason = first_line(error)
        raise ValueError(reason) from None
    if TEST_ERROR not in metrics.final:  # a finished run has a test error; without one the file is incomplete
        raise ValueError("no final error/test")
    return metrics


@dataclass
class Run:
    """A run as read back from its directory."""

    path: Path
    net: str  # resnet56-A, plain56, or "?" when nothing says
    data: str  # the data config: cifar10, synthetic, ...
    depth: int | None
    residual: bool | None
    shortcut: str | None  # identity, projection, full; None for a plain net or where nothing says
    finished: bool
    note: str = ""  # why an unfinished run is left out, and how far it got
    params: int | None = None
    seed: int | None = None
    iterations: int | None = None  # its recipe: what a report compares with the paper's
    batch_size: int | None = None
    lr: float | None = None
    size: int | None = None  # the side of a packed run's squares (data.size)
    preprocess: tuple[str, str] = ("mean", "zeros")  # preprocess.normalize and .pad (before 0.9.0: the paper's)
    final: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> (iteration, %) points
    spec: models.Spec | None = None  # the net, from metrics.json or its saved config; None where they name none

    @property
    def letter(self) -> str:
        """The paper's letter for the shortcut option (A, B, C), "-" for a plain net or a DenseNet."""
        return SHORTCUTS.get(self.shortcut, "-") if self.residual else "-"


def experiment(run: Run) -> tuple:
    """What makes runs one experiment, whose seeds a report's row and a figure's curve average: the data, the
    net and the recipe. Runs of one net with different recipes are different rows and curves."""
    return (run.data, run.net, run.iterations, run.batch_size, run.lr, run.size, run.preprocess)


def find_runs(directories: list[Path], marks: tuple[str, ...] = (METRICS, f"{HYDRA}/config.yaml")) -> list[Path]:
    """Every run directory below `directories`: one that holds any of `marks` (paths inside a run
    directory; by default Hydra's saved config or a metrics.json)."""
    found = set()
    for directory in directories:
        if not directory.is_dir():
            raise ResexpError(f"{directory} is not a directory of runs")
        for mark in marks:
            found.update(path.parents[mark.count("/")] for path in directory.rglob(mark))
    return sorted(found)


def plain_events(run_dir: Path) -> bool:
    """Whether the run's TensorBoard files are regular files, which TensorBoard's reader may read: it
    follows links, and a FIFO or a device would block it, or never end."""
    return all(path.is_file() and not path.is_symlink() for path in run_dir.glob(f"{EVENTS}*"))


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    # TensorBoard's event reader: imported here, since training never reads curves back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not plain_events(run_dir):
        return {}
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    tags = set(events.Tags().get("scalars", []))
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in CURVES if tag in tags}


# What a report reads of an unfinished run's saved config, and the type each must have.
READ_BACK = {
    **{f"model.{key}": schemas.field_types(schemas.ModelSchema)[key] for key in NAME_KEYS},
    **{key: schemas.field_types(schemas.TrainSchema)[key] for key in ("shortcut", "seed")},
    **{f"schedule.{key}": schemas.field_types(schemas.ScheduleSchema)[key] for key in ("iterations", "batch_size")},
    "data.num_classes": int,  # the net's classifier (the spec it is read back as)
    "data.size": int,  # packed ImageNet's squares (resexp/data/packed.py): part of its recipe
    "preprocess.normalize": str,  # CIFAR's centring and padding (conf/preprocess/): part of the recipe too
    "preprocess.pad": str,
}
# What a run's name, its data's and its shortcut's may be, read back from a metrics.json or a saved config
# that may come from anyone: a report writes them into tables (Markdown, CSV) and figures, where anything
# else could be a line of its own, a formula, or markup.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def saved_value(document: Any, key: str, hops: int = 0) -> Any:
    """The value of the dotted `key` in a saved config read as plain YAML, nothing in it resolved: a
    reference to another key (`shortcut: ${model.shortcut}`) is followed, a few hops at most, and anything
    else OmegaConf would resolve (a resolver such as ${oc.env:HOME}, which would read the reader's
    environment) is None."""
    node = document
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, str) and "${" in node:
        reference = re.fullmatch(r"\$\{([A-Za-z_][\w.]*)\}", node)
        return saved_value(document, reference[1], hops + 1) if reference and hops < 8 else None
    return node


def read_yaml(path: Path) -> Any:
    """A YAML file of a run directory as plain data (resexp/files.py: never through a link), None where
    it is missing or unreadable."""
    try:
        return yaml.safe_load(read_bytes(path))
    except (OSError, yaml.YAMLError):
        return None


def read_hydra(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """READ_BACK's values in the run's saved config, each of its type or None (saved_value: nothing is
    resolved), and Hydra's choices (model=..., data=...) that are names; empty where unreadable."""
    saved = read_yaml(run_dir / HYDRA / "config.yaml")
    config = {key: saved_value(saved, key) for key in READ_BACK}
    config = {key: value for key, value in config.items() if value is not None and schemas.fits(value, READ_BACK[key])}
    choices = saved_value(read_yaml(run_dir / HYDRA / "hydra.yaml"), "hydra.runtime.choices")
    choices = choices if isinstance(choices, dict) else {}
    return config, {key: value for key, value in choices.items() if isinstance(value, str) and NAME.fullmatch(value)}


# What the model keys a saved config lacks were in the run that saved it (resexp.models.OLDER): a run of
# resexp before 0.4.0 has no bottleneck_stride (its bottlenecks strode in their 3x3 convs), ...
OLDER = {key.removeprefix("model."): value for key, value in models.OLDER.items()}


def saved_name(model: dict[str, Any], shortcut: str | None) -> str:
    """The net a saved config names, "?" where it names none that resexp makes."""
    try:
        name = model_name(model, shortcut, **OLDER)
    except (KeyError, TypeError, ValueError, ResexpError):  # another stem, a width of 0: not a net of resexp's
        return "?"
    return name if NAME.fullmatch(name) else "?"


def saved_spec(model: dict[str, Any], shortcut: Any, num_classes: Any, older: bool = True) -> models.Spec | None:
    """The net a record names (a metrics.json's spec, a saved config's model node), as its family's spec,
    keys it lacks taking OLDER's values (`older`) or the defaults; None where it names none that resexp
    makes (a record may come from anyone: its values are checked)."""
    try:
        return models.spec_of(model, shortcut, num_classes, **(OLDER if older else {}))
    except (KeyError, TypeError, ValueError, AttributeError, ResexpError):
        return None


def before_0_9(version: str) -> bool:
    """Whether a metrics.json's resexp version is before 0.9.0 (what is no version, as a test's, is not)."""
    found = re.match(r"(\d+)\.(\d+)", version or "")
    return found is not None and (int(found[1]), int(found[2])) < (0, 9)


END = "][END] "  # how train.log marks the line that says how a run ended early (record_end)


def record_end(run_dir: Path, text: str) -> None:
    """Say in the run's train.log how it ended early (a stop, a failure), for `state` to read back: one
    line, appended as the log's own are (never through a link planted in its place)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    line = f"[{stamp}{END}{' '.join(text.split())}\n".encode()
    try:
        fd = open_regular(run_dir / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except OSError:  # the run's directory is gone or not writable: its command's own line says why
        return
    with os.fdopen(fd, "ab") as file:
        file.write(line)


def last_end(run_dir: Path, tail: int = 1 << 16) -> str:
    """What the last end record of the run's train.log says ("" where none), read from its last `tail`
    bytes: a log may be long, and may come from anyone (the text is shown as text, never run)."""
    try:
        with os.fdopen(open_regular(run_dir / LOG), "rb") as file:
            file.seek(max(0, os.fstat(file.fileno()).st_size - tail))
            text = file.read(tail).decode(errors="replace")
    except OSError:
        return ""
    ends = [line.split(END, 1)[1] for line in text.splitlines() if END in line]
    return ends[-1][:300] if ends else ""


@dataclass(frozen=True)
class State:
    """How far a run got, from what its directory holds: metrics.json (finished), its checkpoint (stopped
    there, resumable), and the last end record of its train.log (how it stopped or failed). The one place
    that says it: report, eval and analyze show this."""

    finished: bool
    iteration: int | None  # its checkpoint's (or its last, where finished); None: no readable checkpoint
    planned: int | None  # schedule.iterations of its saved config
    why: str = ""  # its train.log's end record, or why its checkpoint cannot be read
    damaged: bool = False  # it has a checkpoint, which cannot be read (`why` says why)

    @property
    def failed(self) -> bool:
        return self.why.startswith("failed")

    @property
    def short(self) -> str:
        """For a table's column: finished, or stopped (failed) at the iteration its checkpoint holds."""
        if self.finished:
            return "finished"
        if self.damaged or self.iteration is None:
            return "checkpoint unreadable" if self.damaged else "no checkpoint"
        of = f" of {self.planned:,}" if self.planned else ""
        return f"{'failed after' if self.failed else 'stopped at'} {self.iteration:,}{of}"

    def __str__(self) -> str:
        of = f" of {self.planned:,}" if self.planned else ""
        if self.finished:
            return f"finished ({self.iteration:,} iterations)" if self.iteration else "finished"
        if self.damaged:
            return f"its checkpoint cannot be read: {self.why}"
        if self.iteration is None:
            return f"ended before its first checkpoint{': ' + self.why if self.why else ''}"
        if self.failed:  # its last checkpoint stands; the same command may fail the same way
            return f"{self.why}; its checkpoint of iteration {self.iteration:,}{of} stands"
        said = f" ({self.why})" if self.why else ""
        # its command, run again in this directory (hydra.run.dir or hydra.sweep.dir), resumes it
        return f"stopped at iteration {self.iteration:,}{of}, checkpoint saved, resumable in this directory{said}"


def state(run_dir: Path, config: dict[str, Any] | None = None) -> State:
    """The State of the run in `run_dir`; `config`: its saved config's values (read_hydra), where read already."""
    planned = (read_hydra(run_dir)[0] if config is None else config).get("schedule.iterations")
    if (run_dir / METRICS).is_file():
        try:
            iterations = parse_metrics(read_text(run_dir / METRICS)).iterations
            return State(True, iterations, planned)
        except (OSError, ValueError):
            pass  # read as an unfinished run: its checkpoint says how far it got
    if not (run_dir / CHECKPOINT).exists():
        return State(False, None, planned, last_end(run_dir))
    try:
        progress = checkpoint.load(run_dir / CHECKPOINT, layout={"progress": dict})["progress"]
    except ResexpError as error:
        return State(False, None, planned, f"{error}", damaged=True)
    return State(False, progress["iteration"], planned, last_end(run_dir))


def read_run(run_dir: Path) -> Run:
    """The run in `run_dir`: from metrics.json when it finished, else from its saved config and curves."""
    config, choices = read_hydra(run_dir)
    depth, residual = config.get("model.depth"), config.get("model.residual")
    try:
        shortcut = canonical_shortcut(config.get("shortcut")) if residual else None
    except ResexpError:  # a config resexp did not write: the run is named without it
        shortcut = None
    model = {key[len("model.") :]: value for key, value in config.items() if key.startswith("model.")}
    named = depth is not None and (shortcut or not residual)
    net = saved_name(model, shortcut) if named else "?"
    spec = saved_spec(model, config.get("shortcut"), config.get("data.num_classes", 10)) if named else None
    if spec is not None:  # a net of a family without shortcut options has none to show (Spec.shortcut_option)
        shortcut = spec.shortcut_option
    run = Run(
        run_dir, net, choices.get("data", "?"), depth, residual, shortcut, finished=False, seed=config.get("seed")
    )
    run.spec = spec
    run.size = config.get("data.size")
    normalize, pad = config.get("preprocess.normalize", "mean"), config.get("preprocess.pad", "zeros")
    # a saved config may come from anyone: what a report writes of it is one of resexp's names, or "?"
    run.preprocess = (normalize if normalize in NORMALIZATIONS else "?", pad if pad in PADS else "?")
    run.curves = read_curves(run_dir)
    if not (run_dir / METRICS).exists():
        run.note = str(state(run_dir, config))
        return run
    try:
        metrics = parse_metrics(read_text(run_dir / METRICS))
    except OSError as error:
        run.note = f"{METRICS} is {why_not(error)}"
        return run
    except ValueError as error:
        run.note = f"{METRICS} is truncated or malformed ({error})"
        return run
    named = {"net": metrics.net, "data": metrics.data, "shortcut": metrics.shortcut or "none"}
    if strange := next((key for key, value in named.items() if not NAME.fullmatch(value)), None):
        run.note = f"{METRICS} gives its {strange} as {named[strange]!r}, which is no name resexp writes"
        return run
    run.net, run.data, run.depth, run.residual = metrics.net, metrics.data, metrics.depth, metrics.residual
    if metrics.spec is not None:  # since 0.9.0: the net as it trained
        run.spec = saved_spec(
            {key.removeprefix("model."): value for key, value in metrics.spec.items()},
            metrics.spec.get("shortcut"),
            metrics.spec.get("num_classes"),
        )
    elif before_0_9(metrics.resexp):  # named apart where its family's nets changed in 0.9.0
        run.net = models.name_before_0_9(metrics.net, metrics.residual)
    else:  # a metrics.json without a spec or a version: its config's missing keys are the defaults
        run.spec = saved_spec(model, config.get("shortcut"), config.get("data.num_classes", 10), older=False)
    run.shortcut, run.params, run.seed, run.final = metrics.shortcut, metrics.params, metrics.seed, metrics.final
    run.iterations, run.batch_size, run.lr = metrics.iterations, metrics.batch_size, metrics.lr
    run.finished = True
    return run


def swept_keys(sweep_dir: Path) -> list[str] | None:
    """The keys a sweep varies, in the order given (command line, then the sweeper's params of a preset
    such as experiment=cifar10_fig6), from the record Hydra writes before the sweep's first run; None
    where there is no readable record."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        hydra = read_yaml(sweep_dir / SWEEP_RECORD)["hydra"]
        typed = [str(item) for item in hydra["overrides"]["task"]]
        params = hydra.get("sweeper", {}).get("params") or {}
        overrides = OverridesParser.create().parse_overrides([*typed, *(f"{k}={v}" for k, v in params.items())])
    except Exception:  # missing, damaged or foreign: the caller names runs by all their overrides
        return None
    keys = [override.key_or_group for override in overrides if override.is_sweep_override()]
    return list(dict.fromkeys(keys))


def discard_if_empty(directory: Path, hydra_files: set[str]) -> None:
    """Remove `directory` and what Hydra made in it (`hydra_files`) if it holds nothing else. A
    directory with anything more is never touched."""
    if not directory.is_dir() or {entry.name for entry in directory.iterdir()} - hydra_files:
        return
    for name in hydra_files:
        target = directory / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:  # something arrived meanwhile (another run): it stays
        pass


def holds_run(run_dir: Path) -> bool:
    return (run_dir / CHECKPOINT).is_file() or (run_dir / METRICS).is_file()


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """What Hydra rewrites as a run starts in a directory (its saved config, and the log it appends to),
    byte for byte, to be put back if that start is refused: the directory must go on describing the run
    its checkpoint holds."""
    files = [run_dir / LOG, *sorted((run_dir / HYDRA).glob("*.yaml"))]
    return {str(path.relative_to(run_dir)): read_bytes(path, 2**30) for path in files if path.is_file()}


# What Hydra writes into a run directory as the run starts, through open(): a symbolic link planted at
# any of these would have it write elsewhere (resexp's own writes replace files, and so never follow one).
HYDRA_WRITES = (HYDRA, *(f"{HYDRA}/{name}.yaml" for name in ("config", "hydra", "overrides")), LOG)


def written_through(run_dir: Path) -> list[Path]:
    """The paths of `run_dir` that a run writes into rather than replaces: Hydra's (HYDRA_WRITES) and the
    TensorBoard files it adds to, to be checked for planted links before anything is written."""
    return [*(run_dir / name for name in HYDRA_WRITES), *sorted(run_dir.glob(f"{EVENTS}*"))]


def put_back(run_dir: Path, before: dict[str, bytes]) -> None:
    """The files of `snapshot` as they were, and no saved-config file that was not there."""
    for name, content in before.items():
        atomic_write(run_dir / name, lambda file, content=content: file.write(content))
    for path in (run_dir / HYDRA).glob("*.yaml"):
        if str(path.relative_to(run_dir)) not in before:
            path.unlink()


@dataclass(frozen=True)
class Place:
    """Where a run writes, and what Hydra made for it before it started."""

    run_dir: Path  # the run's directory
    in_sweep: bool = False  # one run of a sweep: the sweep's directory is taken back as a whole (take_back_sweep)
    chosen: bool = True  # the user chose hydra.run.dir / hydra.sweep.dir: the folders around it are theirs
    # a run's directory that held a run already: its files that Hydra rewrote as this start began (snapshot)
    before: dict[str, bytes] | None = field(default=None, repr=False, compare=False)

    def take_back(self) -> None:
        """Bad input: remove what Hydra made for a run that never started (its directory, saved config,
        log file), or that failed before its first checkpoint (and its curves), and the default folders
        under outputs/ that it leaves empty. Anything else stays; a directory that held a run already is put
        back as it was, byte for byte."""
        if self.before is not None:
            put_back(self.run_dir, self.before)
            return
        curves = {path.name for path in self.run_dir.glob(f"{EVENTS}*")}  # of a run that failed before a checkpoint
        discard_if_empty(self.run_dir, {HYDRA, LOG, LOCK, *curves})
        if not self.in_sweep:
            discard_default_parents(self.run_dir, self.chosen)


def take_back_sweep(sweep_dir: Path, chosen: bool, record: bytes | None = None) -> None:
    """A sweep ended by bad input: its directory if no run is left in it, and the default folders around it;
    the record of a sweep that was there already (`record`, its multirun.yaml) as it was."""
    if record is not None:
        atomic_write(sweep_dir / SWEEP_RECORD, lambda file: file.write(record))
        return
    discard_if_empty(sweep_dir, {SWEEP_RECORD, LOCK})
    discard_default_parents(sweep_dir, chosen)


def discard_default_parents(directory: Path, chosen: bool) -> None:
    """The folders that the default run and sweep directories nest in (outputs/<date>/, outputs/multirun/<date>/,
    outputs/ itself), where they are left empty; never those around a directory the user chose."""
    if chosen:
        return
    outputs = Path("outputs").absolute()  # Hydra's default directories are relative to the working directory
    for parent in directory.absolute().parents:
        if not parent.is_relative_to(outputs):
            break
        discard_if_empty(parent, set())
