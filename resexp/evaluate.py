"""`resexp eval` and `resexp export`: a trained run used outside its training. Its net and data are
made again from the run's own record (config.saved_run), its weights read from its checkpoint as data
only (checkpoint.load: tensors and numbers, never code)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from resexp import checkpoint
from resexp.data import Data
from resexp.files import atomic_write
from resexp.models import NetSpec
from resexp.models.resnet import torchvision_keys
from resexp.runs import CHECKPOINT
from resexp.train import evaluate


@dataclass(frozen=True)
class SavedRun:
    """A run as its directory records it (config.saved_run): enough to make its net and data again."""

    run_dir: Path
    net: NetSpec
    data: Callable[..., Data]  # the data config's builder: (batch_size=, seed=, device=) -> Data
    batch_size: int
    seed: int


def weights(run: SavedRun) -> tuple[dict[str, torch.Tensor], int]:
    """The run's latest weights and the iteration they are from."""
    state = checkpoint.load(run.run_dir / CHECKPOINT)
    return state["model"], int(state["progress"]["iteration"])


def evaluate_run(run: SavedRun, device: torch.device, precision: str) -> list[dict[str, Any]]:
    """The error of the run's latest weights on each held-out set of its data: single view (the test
    set of CIFAR-10, ImageNet's validation images' centre crops), and ImageNet's 10-crop testing (§3.4)
    as the test set. One row per set."""
    state, iteration = weights(run)
    model = run.net.build()
    model.load_state_dict(state)
    model.to(device, memory_format=torch.channels_last)
    data = run.data(batch_size=run.batch_size, seed=run.seed, device=device)
    rows = []
    for split, batches in {**data.evals, **data.final}.items():
        result = evaluate(model, batches, device, precision)
        rows.append(
            {
                "run": str(run.run_dir),
                "net": run.net.name,
                "iteration": iteration,
                "set": split,
                "views": int(result["views"]),
                "error": result["error"],
                **({"error_top5": result["error_top5"]} if data.top5 else {}),
                "loss": result["loss"],
            }
        )
    return rows


def export_run(run: SavedRun, out_dir: Path) -> list[Path]:
    """Write the run's weights alone: `<net>.pt`, {net, spec, iteration, state_dict} that
    `torch.load(weights_only=True)` reads and `NetSpec(**spec).build().load_state_dict` takes; and,
    for a net that torchvision also builds (option-B ImageNet ResNets), `<net>-torchvision.pt`, a state
    dict with torchvision's keys for `torchvision.models.resnetNN(num_classes=...)`."""
    state, iteration = weights(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = run.net.name
    files = {
        out_dir / f"{name}.pt": {
            "net": name,
            "spec": dataclasses.asdict(run.net),
            "iteration": iteration,
            "state_dict": state,
        }
    }
    if (rename := torchvision_keys(run.net)) is not None:
        files[out_dir / f"{name}-torchvision.pt"] = {rename(key): tensor for key, tensor in state.items()}
    for path, content in files.items():
        atomic_write(path, lambda file, content=content: torch.save(content, file))
    return list(files)
