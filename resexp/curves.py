"""The run's TensorBoard curves, as the training loop reports them: at each log point the training error,
loss and rate, at each evaluation the held-out sets' errors and losses, every `grad_norms_every` steps the
3x3 layers' gradient norms, and the lowest of each error with its iteration. The tags are named here,
in resexp/tags.py; rank 0 writes, the other ranks keep the lowest errors alone."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.tensorboard import SummaryWriter

from resexp.files import refuse_links
from resexp.logs import Board
from resexp.probes import response_layers, stage_names, step_gradient_norms
from resexp.runs import EVENTS
from resexp.tags import HELD_OUT_METRICS, LR, TOP5, TRAIN_ERROR, TRAIN_LOSS, held_out_tag, iteration_tag


class Curves:
    """The curves of one run, written through `writer` (a NoWriter off rank 0) and its `board`'s
    comparison tags; `best` (the run's Progress.best) keeps each error's lowest value and its iteration."""

    def __init__(self, run_dir: Path, iteration: int, *, main: bool, board: Board | None, model: nn.Module,
                 held_out: list[str], best: dict[str, float], resumed: bool) -> None:  # fmt: skip
        self.writer = open_writer(run_dir, iteration) if main else NoWriter()
        self.board, self.best, self.main = board if main else None, best, main
        self.error_tags = [TRAIN_ERROR, *(held_out_tag("error", name) for name in held_out)]
        self.layers = response_layers(model)  # whose gradient norms are logged (grad_norms_every)
        self.stages = stage_names(model, self.layers)
        if not resumed and self.board is not None:
            self.board.describe(self.writer, self.error_tags)

    def error(self, tag: str, value: float, iteration: int) -> None:
        self.writer.add_scalar(tag, value, iteration)
        if self.board is not None:
            self.writer.add_scalar(self.board.compare_tag(tag), value, iteration)
        if value < self.best.get(tag, math.inf):
            self.best[tag], self.best[iteration_tag(tag)] = value, iteration

    def training(self, iteration: int, final: dict[str, float], lr: float) -> None:
        """A log point: the training error and loss of the steps since the last one (in `final`, where
        there were any), and the rate."""
        if TRAIN_ERROR in final:
            self.error(TRAIN_ERROR, final[TRAIN_ERROR], iteration)
            self.writer.add_scalar(TRAIN_LOSS, final[TRAIN_LOSS], iteration)
        self.writer.add_scalar(LR, lr, iteration)

    def held_out(
        self, name: str, result: dict[str, float], iteration: int, final: dict[str, float], top5: bool
    ) -> None:
        """An evaluation of the held-out set `name`: its metrics (the top-5 error where `top5`) into `final`
        and the curves."""
        for metric in [metric for metric in HELD_OUT_METRICS if top5 or metric != TOP5]:
            final[held_out_tag(metric, name)] = result[metric]
            if metric != "error":
                self.writer.add_scalar(held_out_tag(metric, name), result[metric], iteration)
        self.error(held_out_tag("error", name), result["error"], iteration)

    def gradient_norms(self, iteration: int) -> None:
        """What the last step left in the 3x3 layers' gradients, where it left any."""
        if self.main and (norms := step_gradient_norms(self.layers)) is not None:
            write_gradient_norms(self.writer, norms.tolist(), self.stages, iteration)

    def finish(self, iteration: int) -> None:
        """The run's last point: its HPARAMS row's lowest errors."""
        if self.board is not None:
            lowest = {tag: value for tag, value in self.best.items() if tag in self.error_tags}
            self.board.finish(self.writer, lowest, iteration)


def open_writer(run_dir: Path, iteration: int) -> SummaryWriter:
    """The run's TensorBoard writer for a session that starts after `iteration`. Where an earlier session
    left event files (it stopped, or was killed before its first checkpoint), the new file starts with a
    restart marker at iteration + 1 (purge_step), and TensorBoard drops every point the earlier files
    hold from there on: those the checkpoint does not cover. TensorBoard reads a run's files in name
    order, and a name starts with the second its file was opened; a session opened within the second
    of the previous one's could sort before it and lose its points to that file's marker, so it waits
    for the next second (at most one). A link planted among them is refused (resexp/files.py), and a
    failing write (a full disk) is raised by the writer's next call, in the run's thread, not also printed
    as the writer thread's traceback."""
    files = sorted(run_dir.glob(f"{EVENTS}*"))
    refuse_links(files)
    quiet_writer_threads()
    seconds = (path.name.removeprefix(EVENTS).split(".")[0] for path in files)
    opened = [int(second) for second in seconds if second.isdigit()]
    if not opened:
        return SummaryWriter(log_dir=str(run_dir))
    while int(time.time()) <= max(opened):
        time.sleep(0.05)
    return SummaryWriter(log_dir=str(run_dir), purge_step=iteration + 1)


def quiet_writer_threads() -> None:
    """TensorBoard's writer thread re-raises a failed write after keeping it for the writer's next call
    (which raises it in the run's thread: resexp/train.py says it in one line): Python would also print
    the thread's traceback. Once per process."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "quiets", None) is _AsyncWriterThread:
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)

    hook.quiets = _AsyncWriterThread
    threading.excepthook = hook


def write_gradient_norms(writer: SummaryWriter, norms: list[float], stages: list[str], iteration: int) -> None:
    """One step's gradient norms of the 3x3 layers (resexp/probes.py): per stage the norm over its
    layers (SCALARS), the first layer's over the last one's, and a histogram whose buckets are the
    layers, input side first, and whose heights are their norms: HISTOGRAMS draws norm against depth at
    every point logged. A step with a non-finite gradient writes nothing."""
    if not all(math.isfinite(norm) for norm in norms):
        return
    for stage in dict.fromkeys(stages):
        total = math.sqrt(sum(norm * norm for norm, where in zip(norms, stages) if where == stage))
        writer.add_scalar(f"gradient norm/{stage}", total, iteration)
    writer.add_scalar("gradient norm/first over last", norms[0] / norms[-1] if norms[-1] else math.nan, iteration)
    layers = range(1, len(norms) + 1)
    writer.add_histogram_raw(
        "gradient norm/by layer",
        min=1,
        max=len(norms),
        num=sum(norms),
        sum=sum(layer * norm for layer, norm in zip(layers, norms)),
        sum_squares=sum(layer * layer * norm for layer, norm in zip(layers, norms)),
        bucket_limits=list(layers),
        bucket_counts=norms,
        global_step=iteration,
    )


class NoWriter:
    """Where a rank other than 0 writes its curves: nowhere (rank 0 writes the run's, resexp/distributed.py)."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
