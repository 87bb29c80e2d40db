"""The training loop: iteration-based, as the paper counts its CIFAR schedule (§4.2)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from resexp.data import Data
from resexp.errors import ResexpError
from resexp.logs import display, log


@dataclass(frozen=True)
class Schedule:
    iterations: int  # training steps in all
    milestones: tuple[int, ...]  # iterations at which the learning rate is multiplied by `gamma`
    gamma: float  # the factor at each milestone (the paper divides by 10)
    warmup_lr: float | None  # the learning rate until the training error falls below `warmup_until_error`; None: no warm-up
    warmup_until_error: float  # % training error that ends the warm-up


def learning_rate(iteration: int, base_lr: float, schedule: Schedule, warming_up: bool) -> float:
    """The learning rate for the step after `iteration` completed steps."""
    if warming_up and schedule.warmup_lr is not None:
        return schedule.warmup_lr
    return base_lr * schedule.gamma ** sum(iteration >= m for m in schedule.milestones)


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # channels_last (NHWC) lets the convolution kernels skip layout transposes: measured 12% faster
    # training and 27% faster evaluation for ResNet-20 on a 2-core CPU; GPUs gain more.
    x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches, epoch after epoch; each epoch the loader draws a new permutation."""
    while True:
        yield from loader


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """(error in %, mean cross-entropy) over the whole loader."""
    model.eval()
    totals = torch.zeros(3, device=device)  # loss sum, wrong predictions, images
    for x, y in loader:
        x, y = to_device(x, y, device)
        out = model(x)
        loss = nn.functional.cross_entropy(out, y, reduction="sum")
        totals += torch.stack([loss, (out.argmax(1) != y).sum(), torch.tensor(len(y), device=device)])
    model.train()
    loss_sum, wrong, seen = totals.tolist()
    return 100 * wrong / seen, loss_sum / seen


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Data,
    schedule: Schedule,
    *,
    device: torch.device,
    run_dir: Path,
    eval_every: int,
    log_every: int,
) -> dict:
    """Train for `schedule.iterations` steps, logging to TensorBoard in `run_dir`; returns a summary."""
    base_lr = optimizer.param_groups[0]["lr"]
    warming_up = schedule.warmup_lr is not None
    criterion = nn.CrossEntropyLoss()
    totals = torch.zeros(3, device=device)  # since the last log point: loss sum, wrong predictions, images
    final: dict[str, float] = {}
    best: dict[str, float] = {}
    started = time.perf_counter()
    train_seconds, mark, logged_at, logged_seconds = 0.0, started, 0, 0.0
    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        with display(schedule.iterations) as screen:
            model.train()
            stream = batches(data.train)
            for iteration in range(1, schedule.iterations + 1):
                lr = learning_rate(iteration - 1, base_lr, schedule, warming_up)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x, y = next(stream)
                x, y = to_device(x, y, device)  # (B, 3, H, W), (B,)
                out = model(x)  # (B, num_classes)
                loss = criterion(out, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    totals += torch.stack([loss * len(y), (out.argmax(1) != y).sum(), torch.tensor(len(y), device=device)])
                screen.advance(iteration)

                last = iteration == schedule.iterations
                if iteration % log_every == 0 or last:
                    loss_sum, wrong, seen = totals.tolist()  # the one host sync per interval
                    totals.zero_()
                    now = time.perf_counter()
                    train_seconds, mark = train_seconds + now - mark, now
                    if not math.isfinite(loss_sum):
                        raise ResexpError(f"the training loss became {loss_sum / seen} at iteration {iteration}")
                    final["error/train"], final["loss/train"] = 100 * wrong / seen, loss_sum / seen
                    writer.add_scalar("error/train", final["error/train"], iteration)
                    writer.add_scalar("loss/train", final["loss/train"], iteration)
                    writer.add_scalar("lr", lr, iteration)
                    speed = (iteration - logged_at) / max(train_seconds - logged_seconds, 1e-9)
                    logged_at, logged_seconds = iteration, train_seconds
                    screen.show(
                        iteration,
                        f"loss {final['loss/train']:.3f}  train err {final['error/train']:5.2f}%  lr {lr:g}  {speed:.1f} it/s",
                    )
                    if warming_up and final["error/train"] < schedule.warmup_until_error:
                        # §4.2 (ResNet-110): 0.01 "until the training error is below 80%", then back to 0.1.
                        warming_up = False
                        log.info("warm-up over at iteration %d (train error %.1f%%)", iteration, final["error/train"])
                if iteration % eval_every == 0 or last:
                    train_seconds += time.perf_counter() - mark
                    for name, loader in data.evals.items():
                        error, loss_value = evaluate(model, loader, device)
                        final[f"error/{name}"], final[f"loss/{name}"] = error, loss_value
                        writer.add_scalar(f"error/{name}", error, iteration)
                        writer.add_scalar(f"loss/{name}", loss_value, iteration)
                        if error < best.get(f"error/{name}", math.inf):
                            best[f"error/{name}"], best[f"iteration/{name}"] = error, iteration
                    log.info(
                        "it %d/%d  %s",
                        iteration,
                        schedule.iterations,
                        "  ".join(f"{name} err {final[f'error/{name}']:.2f}%" for name in data.evals),
                    )
                    mark = time.perf_counter()  # evaluation time is not training time
    finally:
        writer.close()
    return {
        "final": final,
        "best": best,
        "train_time_s": train_seconds,
        "wall_time_s": time.perf_counter() - started,
    }
