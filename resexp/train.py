"""The training loop: iteration-based, as the paper counts its CIFAR schedule (§4.2), and resumable
exactly: everything the loop carries from one step to the next is in its checkpoint."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resexp import checkpoint, distributed
from resexp.curves import Curves
from resexp.data import Data
from resexp.errors import Interrupted, ResexpError, first_line
from resexp.evaluate import evaluate
from resexp.logs import Board, Display, log
from resexp.runs import CHECKPOINT
from resexp.step import Step, restore_rng_states, rng_states, set_lr, to_device
from resexp.tags import TRAIN_ERROR, TRAIN_LOSS, held_out_tag

MAX_SKIPPED_IN_A_ROW = 100  # on_nonfinite=skip gives up when the net has clearly diverged
# The 2015 warm-up ends when the training error of the last WARMUP_WINDOW iterations is below its bound,
# judged every WARMUP_WINDOW iterations whatever log_every is: judged on a few steps, an early lucky batch
# ended it at iteration 30 with log_every=10, and ResNet-56 then collapsed to the chance loss.
WARMUP_WINDOW = 100


@dataclass(frozen=True)
class Schedule:
    iterations: int  # training steps in all
    milestones: tuple[int, ...]  # iterations at which the learning rate is multiplied by `gamma`
    gamma: float  # the factor at each milestone (the paper divides by 10)
    # the learning rate until the training error falls below `warmup_until_error`; None: no warm-up
    warmup_lr: float | None
    warmup_until_error: float  # % training error that ends the warm-up
    # the warm-up's length in iterations (He et al. 2016: 400); None: until warmup_until_error (2015)
    warmup_iterations: int | None = None


@dataclass(frozen=True)
class Loop:
    """How the loop runs a schedule: the rate it scales, how often it logs, evaluates and checkpoints."""

    schedule: Schedule
    base_lr: float  # the learning rate the schedule scales (a checkpoint's optimizer holds the scaled one)
    eval_every: int  # iterations between evaluations of the held-out sets; once more at the end
    log_every: int  # iterations between training-error points and log lines
    checkpoint_every: int  # iterations between checkpoints; once more at the end, and on a stop request
    on_nonfinite: str  # a NaN/inf training loss: "stop" the run, or "skip" the step
    precision: str  # fp32 or bf16 autocast, for evaluation as for training
    grad_norms_every: int = 0  # iterations between the 3x3 layers' gradient norms in TensorBoard; 0: never


@dataclass(frozen=True)
class Remedies:
    """What the user can do after a non-finite loss or weights, as commands that work (config.py writes
    them for the run at hand: the same directory, the same settings but the one that changes)."""

    skip: str = "set on_nonfinite=skip to skip such steps"  # go on from the last checkpoint, skipping bad steps
    lower_rate: str = "start over at a lower optim.lr"  # the rate is part of the run: a new run


@dataclass
class Progress:
    """What the loop carries between steps besides the model, optimizer and data stream."""

    iteration: int = 0  # steps completed
    warming_up: bool = False  # still at the warm-up learning rate
    final: dict[str, float] = field(default_factory=dict)  # latest value of every logged metric
    best: dict[str, float] = field(default_factory=dict)  # lowest evaluation errors and their iterations
    train_seconds: float = 0.0  # time spent in training steps, evaluation excluded
    wall_seconds: float = 0.0  # time of the whole run, over all its sessions
    skipped: int = 0  # steps skipped for a non-finite loss (on_nonfinite=skip)
    logged_at: int = 0  # iteration of the last training log point
    logged_seconds: float = 0.0  # train_seconds at that point
    warmup_window: list[float] = field(default_factory=lambda: [0.0, 0.0])  # wrong predictions, images in it


def learning_rate(iteration: int, base_lr: float, schedule: Schedule, warming_up: bool) -> float:
    """The learning rate for the step after `iteration` completed steps."""
    if warming_up and schedule.warmup_lr is not None:
        return schedule.warmup_lr
    return base_lr * schedule.gamma ** sum(iteration >= m for m in schedule.milestones)


def warmup_over(iteration: int, schedule: Schedule, window: torch.Tensor) -> bool:
    """Whether the warm-up ends after `iteration`: He et al. 2016's after its `warmup_iterations` ("0.01 at
    the beginning 400 iterations"); the 2015 paper's (§4.2, ResNet-110: 0.01 "until the training error is
    below 80%") where the training error of `window`, the last WARMUP_WINDOW iterations (summed over the
    processes), is below the bound. The window restarts at each WARMUP_WINDOW-th iteration."""
    if schedule.warmup_iterations is not None:
        return iteration >= schedule.warmup_iterations
    if iteration % WARMUP_WINDOW:
        return False
    wrong, seen = distributed.all_sum(window.clone()).tolist()
    window.zero_()
    return seen > 0 and 100 * wrong / seen < schedule.warmup_until_error


def nonfinite(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the weights, BN statistics and momentum buffers that hold a NaN or an infinity (one
    host sync for all)."""
    named = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    names = {id(p): name for name, p in model.named_parameters()}
    for p, buffers in optimizer.state.items():
        named += [(f"momentum of {names.get(id(p), '?')}", t) for t in buffers.values() if t.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([t.isfinite().all() for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


ECHO_S = 1.0  # a signal repeated this soon is one stop request (stop_requests)


@contextmanager
def stop_requests() -> Iterator[list[int]]:
    """SIGTERM (cluster preemption) and SIGINT (Ctrl-C), and in a submitit job its warning of a time
    limit or preemption (distributed.preemption_signal), are noted instead of killing the process, so
    the loop can finish its step and save a checkpoint. A second signal stops at once (Interrupted,
    raised in the main thread), unless it is the first one again within ECHO_S: under torchrun a
    terminal's Ctrl-C reaches each process twice, from the terminal and forwarded by torchrun."""
    received: list[int] = []
    first = 0.0

    def note(signum: int, frame: Any) -> None:
        nonlocal first
        if not received:
            received.append(signum)
            first = time.monotonic()
        elif signum != received[0] or time.monotonic() - first > ECHO_S:
            raise Interrupted(signum)

    signums = {signal.SIGTERM, signal.SIGINT, distributed.preemption_signal()} - {None}
    previous = {signum: signal.signal(signum, note) for signum in signums}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, data: Data, saved: dict[str, Any]) -> None:
    """Put a checkpoint's weights, optimizer state, data stream and RNG back: before the step is built,
    since a captured step reads these very tensors. A checkpoint whose parts do not fit the run (a
    damaged file, or one made by hand) raises ValueError saying which part."""
    parts = [
        ("model", model.load_state_dict),
        ("optimizer", optimizer.load_state_dict),
        ("data", data.train.load_state_dict),
        ("rng", restore_rng_states),
        ("progress", lambda progress: Progress(**progress)),
        ("totals", lambda totals: torch.zeros(3).copy_(totals)),
    ]
    for part, put_back in parts:
        try:
            put_back(saved[part])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
            reason = first_line(error)
            raise ValueError(f"its {part} does not fit this run ({reason})") from None


def check_finite(model: nn.Module, optimizer: torch.optim.Optimizer, first_bad: torch.Tensor, *, weights: bool,
                 on_nonfinite: str, iteration: int, kept: str, remedies: Remedies) -> None:  # fmt: skip
    """Stop on a non-finite loss (`first_bad`, the first step that had one, where on_nonfinite=stop) and,
    with `weights`, on non-finite weights, saying what is `kept` and what to do."""
    bad = int(distributed.first_over_ranks(first_bad.clone())) if on_nonfinite == "stop" else 0
    broken = nonfinite(model, optimizer) if weights or bad else []
    if broken:  # the rate overflowed the weights: skipping steps cannot help
        first = f"{broken[0]} and {len(broken) - 1} more" if len(broken) > 1 else broken[0]
        raise ResexpError(
            f"the weights became non-finite by iteration {iteration} ({first}); {kept}; {remedies.lower_rate}"
        )
    if bad:
        raise ResexpError(
            f"the training loss became non-finite at iteration {bad}; {kept}; {remedies.skip}; or {remedies.lower_rate}"
        )


def save(path: Path, identity: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, data: Data,
         state: Progress, totals: torch.Tensor, window: torch.Tensor) -> None:  # fmt: skip
    """The run's checkpoint at `state.iteration`, written by rank 0 for every rank (their weights are the
    same), with every rank's sums since the last log point and in the warm-up's window."""
    summed = distributed.all_sum(totals.clone())
    state.warmup_window = distributed.all_sum(window.clone()).tolist()
    if distributed.WORLD.main:
        checkpoint.save(
            path,
            {
                "identity": identity,
                # clones: a grouped run's tensors are views into its group's (resexp/group.py), and
                # torch.save would write the whole group's storage for each run
                "model": {name: tensor.clone() for name, tensor in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "data": data.train.state_dict(),
                "rng": rng_states(),
                "progress": vars(state),
                "totals": summed.cpu(),
            },
        )


def summary(state: Progress) -> dict[str, Any]:
    """What metrics.json says of the training (resexp/jobs.py writes it)."""
    return {
        "final": state.final,
        "best": state.best,
        "skipped_steps": state.skipped,
        "train_time_s": state.train_seconds,
        "wall_time_s": state.wall_seconds,
    }


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: Step,
    data: Data,
    loop: Loop,
    *,
    run_dir: Path,
    screen: Display,
    stops: list[int],
    identity: dict[str, Any],
    board: Board | None = None,
    resume: dict[str, Any] | None = None,
    remedies: Remedies = Remedies(),
) -> dict[str, Any]:
    """Train for `loop.schedule.iterations` steps with `step` (make_step), logging to TensorBoard in
    `run_dir` and checkpointing there; returns a summary for metrics.json. `identity`: what the
    checkpoints record as the run's settings, for a resume to match. `resume`: the checkpoint that
    `restore` put back, whose loop state this continues. `stops` receives the signals that ask the run
    to checkpoint and stop (see stop_requests). `board`: the run's HPARAMS row and comparison charts.
    `remedies`: what the error that stops a run gone non-finite advises. No checkpoint holds non-finite
    weights, and no evaluation, the last included, is of such weights: the run stops first.

    Under several processes (resexp/distributed.py) every rank runs this loop in step: the sums of a log
    point are summed over the ranks, a stop request is agreed at a log point, so that every rank stops
    after the same step, and rank 0 alone writes the curves and the checkpoints."""
    world, schedule, on_nonfinite = distributed.WORLD, loop.schedule, loop.on_nonfinite
    device, path = next(model.parameters()).device, run_dir / CHECKPOINT
    state = Progress(**resume["progress"]) if resume else Progress(warming_up=schedule.warmup_lr is not None)
    totals = torch.zeros(3, device=device)  # since the last log point: loss sum, wrong predictions, images
    first_bad = torch.zeros((), dtype=torch.int64, device=device)  # first step with a non-finite loss, 0: none
    window = torch.zeros(2, device=device)  # the warm-up's window: wrong predictions, images
    if resume is not None:
        if world.main:  # the sums of every rank, added to again by each: on one rank only
            totals.copy_(resume["totals"])
            window.copy_(torch.tensor(state.warmup_window))
        log.info("resuming %s at iteration %d", path, state.iteration)
    saved_at = state.iteration if resume is not None else None  # the iteration of the checkpoint on disk

    def kept() -> str:
        return "no checkpoint was written yet" if saved_at is None else f"{path} (iteration {saved_at}) is kept"

    def stop_if_nonfinite(weights: bool) -> None:
        check_finite(model, optimizer, first_bad, weights=weights, on_nonfinite=on_nonfinite,
                     iteration=state.iteration, kept=kept(), remedies=remedies)  # fmt: skip

    held_out_names = [*data.evals, *data.final]
    curves = Curves(run_dir, state.iteration, main=world.main, board=board, model=model, held_out=held_out_names,
                    best=state.best, resumed=resume is not None)  # fmt: skip
    started = mark = time.perf_counter()
    wall_before, in_a_row, lr_now = state.wall_seconds, 0, math.nan
    try:
        model.train()
        while state.iteration < schedule.iterations:
            iteration = state.iteration + 1
            lr = learning_rate(iteration - 1, loop.base_lr, schedule, state.warming_up)
            if lr != lr_now:  # a write into the optimizer's lr tensor, which the captured step reads
                set_lr(optimizer, lr)
                lr_now = lr
            x, y = to_device(*next(data.train), device)  # (B, 3, H, W), (B,)
            stats = step(x, y)  # (summed loss, wrong predictions, images), on the device
            if on_nonfinite == "skip" and not torch.isfinite(stats[0]):  # the step left the weights alone
                state.skipped, in_a_row = state.skipped + 1, in_a_row + 1
                log.warning("iteration %d: non-finite loss, step skipped", iteration)
                if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise ResexpError(
                        f"{in_a_row} steps in a row had a non-finite loss up to iteration {iteration}: the run has "
                        f"diverged; {remedies.lower_rate}"
                    )
            else:
                in_a_row = 0
                first_bad.copy_(torch.where((first_bad == 0) & ~torch.isfinite(stats[0]), iteration, first_bad))
                totals += stats
                window += stats[1:] if state.warming_up else 0
            state.iteration = iteration
            if state.warming_up and warmup_over(iteration, schedule, window):
                state.warming_up = False
                log.info("warm-up over at iteration %d", iteration)
            if loop.grad_norms_every and iteration % loop.grad_norms_every == 0:
                curves.gradient_norms(iteration)  # what the step just left
            screen.advance(iteration)
            last = iteration == schedule.iterations

            logging_now = iteration % loop.log_every == 0 or last
            if logging_now:
                # the one host sync per interval; under several processes, also where they agree to stop
                loss_sum, wrong, seen = distributed.all_sum(totals.clone()).tolist()
                stop_if_nonfinite(weights=False)
                totals.zero_()
                now = time.perf_counter()
                state.train_seconds, mark = state.train_seconds + now - mark, now
                if seen:
                    state.final[TRAIN_ERROR], state.final[TRAIN_LOSS] = 100 * wrong / seen, loss_sum / seen
                curves.training(iteration, state.final if seen else {}, lr)
                speed = (iteration - state.logged_at) / max(state.train_seconds - state.logged_seconds, 1e-9)
                state.logged_at, state.logged_seconds = iteration, state.train_seconds
                screen.show(iteration, f"loss {state.final.get(TRAIN_LOSS, math.nan):.3f}  train err "
                            f"{state.final.get(TRAIN_ERROR, math.nan):5.2f}%  lr {lr:g}  {speed:.1f} it/s")  # fmt: skip
            evaluating = iteration % loop.eval_every == 0 or last
            if evaluating:
                state.train_seconds += time.perf_counter() - mark
                distributed.same_buffers(model)
                stop_if_nonfinite(weights=True)
                held_out = {**data.evals, **(data.final if last else {})}
                for name, batches in held_out.items():
                    result = evaluate(model, batches, device, loop.precision)
                    curves.held_out(name, result, iteration, state.final, data.top5)
                errors = "  ".join(f"{name} err {state.final[held_out_tag('error', name)]:.2f}%" for name in held_out)
                log.info("it %d/%d  %s", iteration, schedule.iterations, errors)
                mark = time.perf_counter()  # evaluation time is not training time
            if last:
                curves.finish(iteration)
            # alone, a stop request is acted on at once; several processes agree on one at log points
            stopping = bool(stops) if world.size == 1 else logging_now and distributed.any_rank(bool(stops), device)
            if iteration % loop.checkpoint_every == 0 or last or stopping:
                if not evaluating:  # checked before the evaluation already, and no step since
                    distributed.same_buffers(model)
                    stop_if_nonfinite(weights=True)
                curves.writer.flush()  # the curves reach disk no later than the checkpoint that covers them
                state.wall_seconds = wall_before + time.perf_counter() - started
                save(path, identity, model, optimizer, data, state, totals, window)
                saved_at = state.iteration
            if stopping and not last:
                raise Interrupted(stops[0] if stops else signal.SIGTERM, iteration)
        curves.writer.close()  # its last points on disk, or the error of a write that failed
    except OSError as error:  # TensorBoard's writes: the checkpoint's and the data's say their own
        raise ResexpError(
            f"could not write the run's TensorBoard curves in {run_dir} ({error.strerror or first_line(error)}); "
            f"{kept()}; once they can be written, the same command resumes"
        ) from None
    finally:
        with contextlib.suppress(OSError):  # after an error, that error is what is said
            curves.writer.close()
    state.wall_seconds = wall_before + time.perf_counter() - started
    return summary(state)
