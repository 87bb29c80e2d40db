"""What a run shows: log lines or a progress bar, and its TensorBoard description."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from rich import get_console
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

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


@contextmanager
def displays(runs: list[tuple[str, int]], console: Console | None = None) -> Iterator[list[Display]]:
    """One display per run (label, iterations): progress bars on a terminal, all in one rich Progress
    (runs of a shared-GPU sweep train at once), log lines elsewhere; both share rich's console with the
    log handler."""
    console = console or get_console()
    if not console.is_terminal:
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


def describe_run(writer: SummaryWriter, hparams: dict[str, Any], metric_tags: list[str]) -> None:
    """TensorBoard's HPARAMS tab (this run's settings against its final errors, across a sweep) and a
    CUSTOM SCALARS view with every run's training and held-out error side by side."""
    for record in hparams_summary(hparams, {tag: 0.0 for tag in metric_tags}):  # values come from the scalars
        writer.file_writer.add_summary(record)
    held_out = [tag for tag in metric_tags if tag != "error/train"]
    writer.add_custom_scalars(
        {
            "plain vs residual": {
                "training error (%)": ["Multiline", ["error/train"]],
                "test error (%)": ["Multiline", held_out],
            }
        }
    )
