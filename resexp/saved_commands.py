"""`resexp eval` and `resexp export`: a saved run's error again from its checkpoint, and its weights alone
(with torchvision's keys where its family has a twin there)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from resexp.evaluate import evaluate
from resexp.files import atomic_write
from resexp.saved import SavedRun, built, weights
from resexp.step import choose_algorithms


def evaluate_run(run: SavedRun, device: torch.device, precision: str) -> list[dict[str, Any]]:
    """The error of the run's latest weights on each held-out set of its data: single view (the test
    set of CIFAR-10, ImageNet's validation images' centre crops), and ImageNet's 10-crop testing (§3.4)
    as the test set. One row per set."""
    choose_algorithms(False, precision)  # fp32 as fp32: no TensorFloat-32 on CUDA
    state, iteration = weights(run)
    model = built(run, state)
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
    """Write the run's weights alone: `<net>.pt`, {net, arch, spec, iteration, state_dict} that
    `torch.load(weights_only=True)` reads and `resexp.models.FAMILIES[arch](**spec).build().load_state_dict`
    takes (the family's spec); and,
    for a net that torchvision also builds (option-B ImageNet ResNets), `<net>-torchvision.pt`, a state
    dict with torchvision's keys for `torchvision.models.resnetNN(num_classes=...)`."""
    state, iteration = weights(run)
    built(run, state)  # weights that fit the net, or one line: never an export that cannot be loaded
    out_dir.mkdir(parents=True, exist_ok=True)
    name = run.net.name
    files = {
        out_dir / f"{name}.pt": {
            "net": name,
            "arch": run.net.model_values()["model.arch"],
            "spec": dataclasses.asdict(run.net),
            "iteration": iteration,
            "state_dict": state,
        }
    }
    if (rename := run.net.torchvision_keys()) is not None:  # where its family has a twin in torchvision
        files[out_dir / f"{name}-torchvision.pt"] = {rename(key): tensor for key, tensor in state.items()}
    for path, content in files.items():
        atomic_write(path, lambda file, content=content: torch.save(content, file))
    return list(files)
