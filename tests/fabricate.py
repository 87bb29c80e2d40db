"""Run directories as resexp writes them (metrics.json, TensorBoard events, Hydra's config), with
made-up numbers, for testing the report without training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml
from torch.utils.tensorboard import SummaryWriter


def fake_run(
    run_dir: Path,
    *,
    depth: int,
    residual: bool,
    final_train: float,
    final_test: float,
    final_top5: float | None = None,
    seed: int = 0,
    data: str = "cifar10",
    shortcut: str = "identity",
    iterations: int = 64_000,
    finished: bool = True,
    points: int = 32,
) -> Path:
    """Curves that fall from 90% towards the final errors, with the paper's drops at 50% and 75%."""
    run_dir.mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    model = {"depth": depth, "residual": residual, "block": "basic", "stem": "cifar", "shortcut": "identity"}
    config = {"model": model, "shortcut": shortcut, "seed": seed, "schedule": {"iterations": iterations}}
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"data": data}}}}))
    stop = iterations if finished else iterations // 2
    writer = SummaryWriter(str(run_dir))
    for index in range(1, points + 1):
        step = stop * index // points
        progress = step / iterations
        settle = 1 - math.exp(-6 * progress)
        drop = 0.45 if progress >= 0.5 else 1.0
        for tag, final in (("error/train", final_train), ("error/test", final_test)):
            value = 90 - (90 - final * (1 + 0.6 * drop)) * settle if progress < 1 else final
            writer.add_scalar(tag, value, step)
    writer.close()
    if finished:
        name = (
            f"resnet{depth}-{ {'identity': 'A', 'projection': 'B', 'full': 'C'}[shortcut] }"
            if residual
            else f"plain{depth}"
        )
        metrics = {
            "net": name,
            "data": data,
            "depth": depth,
            "residual": residual,
            "params": 1000 * depth,
            "seed": seed,
            "final": {"error/train": final_train, "error/test": final_test},
            "iterations": iterations,
        }
        if final_top5 is not None:  # ImageNet runs log the top-5 error too
            metrics["final"]["error_top5/test"] = final_top5
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir
