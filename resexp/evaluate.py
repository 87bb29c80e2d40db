"""A net's error on held-out images (`evaluate`, during training and after), and `resexp eval` and
`resexp export`: a trained run used outside its training. Its net and data are made again from the
run's own record (config.saved_run), its weights read from its checkpoint as data only
(checkpoint.load: tensors and numbers, never code)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resexp import checkpoint
from resexp.data import Data
from resexp.distributed import all_sum
from resexp.errors import ResexpError, first_line
from resexp.files import atomic_write
from resexp.models import NetSpec, Spec, check_size
from resexp.models.resnet import torchvision_keys
from resexp.runs import CHECKPOINT
from resexp.step import at_least_fp32, autocast, choose_algorithms, to_device


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """Top-1 and top-5 error (%) and mean cross-entropy over all batches, and the views per image. A
    batch of several views per image, (B, V, 3, H, W), is scored by the mean of the views' softmax
    (10-crop testing, §3.4). Under several processes each scores its shard of the batches, and the
    counts are summed over them (resexp/distributed.py)."""
    model.eval()
    views = 1
    totals = torch.zeros(4, device=device)  # loss sum, top-1 wrong, top-5 wrong, images
    for x, y in batches:
        views = x.shape[1] if x.dim() == 5 else 1
        x, y = to_device(x.flatten(0, x.dim() - 4), y, device)
        with autocast(device, precision):
            out = model(x)
        # log of the mean probability over the views; one view: log_softmax itself
        log_p = at_least_fp32(out).log_softmax(1).unflatten(0, (len(y), views)).logsumexp(1) - math.log(views)
        totals[0] += nn.functional.nll_loss(log_p, y, reduction="sum")
        totals[1] += (log_p.argmax(1) != y).sum()
        totals[2] += (log_p.topk(min(5, log_p.shape[1]), 1).indices != y[:, None]).all(1).sum()
        totals[3] += len(y)  # a Python number: no host-to-device copy, no sync
    model.train()
    loss_sum, wrong, wrong5, seen = all_sum(totals).tolist()
    return {"error": 100 * wrong / seen, "error_top5": 100 * wrong5 / seen, "loss": loss_sum / seen, "views": views}


@dataclass(frozen=True)
class SavedRun:
    """A run as its directory records it (config.saved_run): enough to make its net and data again."""

    run_dir: Path
    net: Spec
    data: Callable[..., Data]  # the data config's builder: (batch_size=, seed=, device=) -> Data
    batch_size: int
    seed: int


# What evaluating or exporting a run reads of its checkpoint: what it is, its weights, how far it got.
READ = {part: checkpoint.LAYOUT[part] for part in ("identity", "model", "progress")}


def weights(run: SavedRun) -> tuple[dict[str, torch.Tensor], int]:
    """The run's latest weights and the iteration they are from."""
    state = checkpoint.load(run.run_dir / CHECKPOINT, layout=READ)
    return state["model"], int(state["progress"]["iteration"])


def built(run: SavedRun, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The run's net with its saved weights, or a one-line error where they do not fit it."""
    check_size(run.net, torch.device("cpu"))  # built there first
    model = run.net.build()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError) as error:
        raise ResexpError(
            f"{run.run_dir / CHECKPOINT} is damaged: its weights do not fit {run.net.name} ({first_line(error)})"
        ) from None
    # Training never saves such weights (it stops first): the file is damaged, or not resexp's.
    if broken := [name for name, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]:
        more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
        raise ResexpError(
            f"{run.run_dir / CHECKPOINT} holds non-finite weights ({broken[0]}{more}), which resexp never saves: "
            "it is damaged or not resexp's, and is neither evaluated nor exported"
        )
    return model


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
    `torch.load(weights_only=True)` reads and `resexp.models.ARCHS[arch](**spec).build().load_state_dict`
    takes (NetSpec or DenseNetSpec); and,
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
    # torchvision's DenseNets are ImageNet's: a CIFAR one has no torchvision twin
    if isinstance(run.net, NetSpec) and (rename := torchvision_keys(run.net)) is not None:
        files[out_dir / f"{name}-torchvision.pt"] = {rename(key): tensor for key, tensor in state.items()}
    for path, content in files.items():
        atomic_write(path, lambda file, content=content: torch.save(content, file))
    return list(files)
