"""What a run shows: log lines or a progress bar, and its TensorBoard writer and description."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from rich import get_console
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from resexp import distributed
from resexp.files import open_regular
from resexp.models import Spec
from resexp.tags import best_tag

log = logging.getLogger("resexp")


class Display(Protocol):
    def advance(self, iteration: int) -> None: ...
    def show(self, iteration: int, text: str) -> None: ...


class LogLines:
    """Not a terminal (CI, cluster logs): one plain line per logging interval."""

    def __init__(self, total: int) -> None:
        self.total = total

    def advance(self, iteration: int) -> None:
        pass

    def show(self, iteration: int, text: str) -> None:
        log.info("it %d/%d  %s", iteration, self.total, text)


class Bar:
    """A terminal: a rich progress bar with the latest training numbers beside it."""

    def __init__(self, progress: Progress, label: str, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task(label, total=total, stats="")

    def advance(self, iteration: int) -> None:
        self.progress.update(self.task, completed=iteration)

    def show(self, iteration: int, text: str) -> None:
        self.progress.update(self.task, completed=iteration, stats=text)


def console_handler() -> logging.Handler:
    """Log lines for the console (conf/hydra/job_logging/rich.yaml): rich's handler on a terminal, which
    prints above the progress bar, and plain unwrapped lines elsewhere (CI, cluster logs)."""
    console = get_console()
    if console.is_terminal:
        return RichHandler(console=console, show_path=False)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    return handler


class RunLogFile(logging.FileHandler):
    """train.log (conf/hydra/job_logging/rich.yaml): appended to as logging's FileHandler does, but opened
    as any file of a run directory is (resexp/files.py), never through a link planted in its place."""

    def _open(self):  # noqa: ANN202 -- logging.FileHandler's hook: the stream it writes to
        fd = open_regular(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


@contextmanager
def named_lines(label: str, world: distributed.World) -> Iterator[None]:
    """A run's log lines inside: each begins with `label` (a sweep's run, whose lines may interleave with
    its sweep's other runs under joblib or submitit) and, on a rank other than 0, with the rank, which
    logs its warnings to the console alone: rank 0 logs the run (resexp/distributed.py)."""
    app, root = logging.getLogger("resexp"), logging.getLogger()
    rank, run = f"rank {world.rank}: " if not world.main else "", f"{label}: " if label else ""

    def name(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        named = run if not text.startswith(run) else ""  # a line that names its run already keeps one name
        record.msg, record.args = f"{rank}{named}{text}", ()
        return True

    level = app.level
    if not world.main:  # Hydra opened the run's train.log in every process
        for handler in [handler for handler in root.handlers if isinstance(handler, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()
        app.setLevel(logging.WARNING)
    if rank or run:
        app.addFilter(name)
    try:
        yield
    finally:
        app.removeFilter(name)
        app.setLevel(level)


@contextmanager
def displays(runs: list[tuple[str, int]], console: Console | None = None) -> Iterator[list[Display]]:
    """One display per run (label, iterations): progress bars on a terminal, all in one rich Progress
    (runs of a shared-GPU sweep train at once), log lines elsewhere; both share rich's console with the
    log handler. Under several processes rank 0 alone draws bars (the others' lines are off: named_lines)."""
    console = console or get_console()
    if not console.is_terminal or not distributed.WORLD.main:
        yield [LogLines(total) for _, total in runs]
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        yield [Bar(progress, label, total) for label, total in runs]


# Every error curve is written twice: under its own tag (error/test), which SCALARS overlays across
# all runs, and under one that says the run's depth and kind (plain vs residual/56 layers/plain/test),
# which CUSTOM SCALARS' charts select by, since a chart picks its lines by tag, not by run. SCALARS
# sorts its groups by name: these come after error/, loss/ and lr.
COMPARE = "plain vs residual"
SAID_BY_NET = ("residual", "depth", "shortcut")  # HPARAMS columns that a run's net (its name) says already


@dataclass(frozen=True)
class Board:
    """How a run describes itself to TensorBoard: its HPARAMS row and its charts in CUSTOM SCALARS,
    both made from the run's own description, so that a sweep's runs add up to one comparison."""

    hparams: dict[str, Any]  # what tells the run apart: net, residual, depth, shortcut, seed, what the sweep varies
    depth: int
    residual: bool
    figure: str | None  # the paper's figure that sets these nets side by side (Fig. 6, Fig. 4), if any

    @classmethod
    def of_run(cls, net: Spec, seed: int, varies: dict[str, Any], data: str | None, iterations: int) -> Board:
        """The hyperparameters that tell runs apart, first the net's (net, residual, depth, shortcut),
        the seed, the data and the run's length (runs of `--logdir outputs` differ in these too), then the
        others its sweep varies (`varies`). The paper's figure of plain against residual nets for the
        data: Fig. 6 on CIFAR-10, Fig. 4 on ImageNet."""
        hparams: dict[str, Any] = {
            "net": net.name,
            "residual": str(net.residual).lower(),  # a bool would show as 0 and 1
            "depth": net.depth,
            "shortcut": net.shortcut_option or "none",  # TensorBoard takes no None
            "seed": seed,
            "data": data or "?",
            "iterations": iterations,
        }
        shown = {*hparams, "schedule.iterations"}  # the sweep's own key for the length shown already
        hparams.update({key: value for key, value in varies.items() if key not in shown})
        hparams = {
            key: value if isinstance(value, (bool, int, float, str)) else str(value) for key, value in hparams.items()
        }
        figure = {"cifar10": "Fig. 6", "imagenet": "Fig. 4", "imagenet_packed": "Fig. 4", "imagenette": "Fig. 4"}.get(
            data or ""
        )
        return cls(hparams, net.depth, net.residual, figure)

    def compare_tag(self, tag: str) -> str:
        """error/test of plain-56 -> plain vs residual/56 layers/plain/test."""
        return f"{COMPARE}/{self.depth} layers/{'residual' if self.residual else 'plain'}/{tag.split('/', 1)[1]}"

    def describe(self, writer: SummaryWriter, error_tags: list[str]) -> None:
        """Write the run's HPARAMS row (its hyperparameters against its final and best errors) and its
        part of the CUSTOM SCALARS layout, which TensorBoard merges over the runs by title: one chart
        per depth with its plain and residual runs, and the paper's two panels (plain nets, ResNets)."""
        metrics = [*error_tags, *(best_tag(tag) for tag in error_tags)]
        experiment, start, _ = hparams_summary(self.hparams, {tag: 0.0 for tag in metrics})  # values: the scalars
        # TensorBoard's HPARAMS table shows five columns at first: those marked as differing between runs,
        # then the rest, by name (TensorBoard 2.21). A run's own file cannot tell which differ, so mark those
        # that tell runs apart: the net, the seed, the data, the length and what else the run sets; its
        # depth, residual and shortcut (which the net's name says) are there to filter by, a tick away.
        data = HParamsPluginData.FromString(experiment.value[0].metadata.plugin_data.content)
        for info in data.experiment.hparam_infos:
            info.differs = info.name not in SAID_BY_NET
        experiment.value[0].metadata.plugin_data.content = data.SerializeToString()
        for record in (experiment, start):
            writer.file_writer.add_summary(record)
        figure = f" (paper {self.figure})" if self.figure else ""
        held_out = " and ".join(tag.split("/", 1)[1] for tag in error_tags[1:]) or "held-out"
        # One chart per depth and error: one line per run, the plain net's and the ResNet's (TensorBoard
        # colours lines by run, and a chart of both errors of both nets was four lines in two hues).
        splits = [*(tag.split("/", 1)[1] for tag in error_tags[1:]), "train"]
        writer.add_custom_scalars(
            {
                f"plain vs residual, by depth{figure}": {
                    f"{self.depth} layers, {'training' if split == 'train' else split} error (%): plain against residual": [
                        "Multiline",
                        [f"^{COMPARE}/{self.depth} layers/[^/]+/{split}$"],
                    ]
                    for split in splits
                },
                f"plain nets and ResNets{figure}": {
                    f"plain nets: training and {held_out} error (%)": ["Multiline", [f"^{COMPARE}/[^/]+/plain/"]],
                    f"ResNets: training and {held_out} error (%)": ["Multiline", [f"^{COMPARE}/[^/]+/residual/"]],
                },
            }
        )

    def finish(self, writer: SummaryWriter, best: dict[str, float], iteration: int) -> None:
        """The best errors as scalars at the last iteration (HPARAMS shows a metric's last value)."""
        for tag, value in best.items():
            writer.add_scalar(best_tag(tag), value, iteration)
