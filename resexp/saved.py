"""A trained run read back from its directory, for use outside its training (`resexp eval`, `export`,
`analyze`): its net and data are made again from the run's own record (config.saved_run), its weights read
from its checkpoint as data only (checkpoint.load: tensors and numbers, never code). No evaluation here:
the config edge, which builds a SavedRun, imports none."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from resexp import checkpoint
from resexp.data import Data
from resexp.errors import ResexpError, first_line
from resexp.models import Spec, check_size
from resexp.runs import CHECKPOINT


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
