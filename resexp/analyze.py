"""`resexp analyze RUN_DIR...`: why residual learning works, measured on the user's own runs (finished
or interrupted: each run's latest checkpoint), plain against residual. For every run: its layer
responses (paper Fig. 7), its gradient norms by layer at initialisation and now, a lesion study, and a
1-D slice of its training loss (and, with --plane, a 2-D surface) (resexp/probes.py says how each is measured). Writes analysis.json,
analysis.md and one figure per measurement (PNG, with an SVG beside each)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe on headless machines
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from resexp import probes
from resexp.files import atomic_write_text, staged
from resexp.plots import save_figure
from resexp.report import inline
from resexp.runs import plain_events, state
from resexp.saved import SavedRun, built, weights

POOLING = "std per channel over images and positions, averaged over channels; eval mode, test images"


@dataclass(frozen=True)
class Budget:
    """How much each measurement looks at (the command's options)."""

    images: int  # held-out images for the responses and the lesions
    train_batches: int  # training batches (the run's own stream, augmented) for gradients and the loss slice
    draws: int  # random lesion draws per number of deleted blocks
    points: int  # points of the loss slice, from -1 to 1 times the direction
    plane: int = 0  # points per side of the 2-D loss surface over two directions, -1 to 1 each (0: none)


def held_out(data, images: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `images` images of the run's test set (its first held-out set where it has no test set)."""
    sets = data.evals
    batches, seen = [], 0
    for x, y in sets.get("test", next(iter(sets.values()))):
        batches.append((x[: images - seen], y[: images - seen]))
        seen += len(batches[-1][1])
        if seen >= images:
            break
    return batches


def logged_gradients(run_dir: Path) -> list[dict[str, Any]]:
    """The gradient norms by layer that the run logged while it trained (grad_norms_every), oldest first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not plain_events(run_dir):
        return []
    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0})  # 0: every point
    events.Reload()
    if "gradient norm/by layer" not in events.Tags()["histograms"]:
        return []
    return [
        {"iteration": event.step, "norms": list(event.histogram_value.bucket)}
        for event in events.Histograms("gradient norm/by layer")
    ]


# What analyze does to each run, one step of its progress display each.
STEPS = ("its weights and data", "layer responses", "gradient norms", "lesions", "loss landscape")


def analyze_run(
    run: SavedRun, device: torch.device, budget: Budget, step: Callable[[str], None] = lambda what: None
) -> dict[str, Any]:
    """Every measurement of one run, as plain numbers; `step` is told of each as it starts (STEPS)."""
    step(STEPS[0])
    saved, iteration = weights(run)
    trained = built(run, saved).to(device)
    torch.manual_seed(run.seed)  # the run's own initial weights (resexp/jobs.py builds them so)
    initial = run.net.build().to(device)
    data = run.data(batch_size=run.batch_size, seed=run.seed, device=device)
    test = held_out(data, budget.images)
    train = [data.training_input() for _ in range(budget.train_batches)]
    step(STEPS[1])
    responses = probes.layer_responses(trained, test, device)
    step(STEPS[2])
    gradients = {
        "initial": probes.gradient_norms(initial, train, device),
        "trained": probes.gradient_norms(trained, train, device),
        "logged": logged_gradients(run.run_dir),  # one step's batch each, while it trained
    }
    step(STEPS[3])
    lesion = probes.lesion_study(trained, test, device, budget.draws, run.seed)
    step(STEPS[4])
    return {
        "run": str(run.run_dir),
        "net": run.net.name,
        "residual": run.net.residual,
        "depth": run.net.depth,
        "iteration": iteration,
        "state": state(run.run_dir).short,  # as `resexp report` and `eval` say it
        "responses": responses,
        "gradients": gradients,
        "lesion": lesion,
        "landscape": landscape(trained, train, device, budget, run.seed),
    }


@contextmanager
def progress(total: int, console: Console) -> Iterator[Callable[[str], None]]:
    """What analyze is doing and how long it has left, as `resexp train` shows it: on a terminal a bar with
    the step, the time so far and an estimate of the rest; elsewhere (a pipe, a cluster's log) a line per
    step with the time so far. Yields the function that starts a step."""
    began, done = time.perf_counter(), [0]
    if not console.is_terminal:

        def line(what: str) -> None:
            done[0] += 1
            said = f"analyze {done[0]}/{total}: {what} ({time.perf_counter() - began:.0f} s so far)"
            console.print(said, markup=False, highlight=False, soft_wrap=True)

        yield line
        return
    columns = (TextColumn("analyze: {task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("", total=total)

        def advance(what: str) -> None:
            bar.update(task, description=escape(what), completed=done[0])
            done[0] += 1

        yield advance
        bar.update(task, completed=total)


def span(points: int) -> list[float]:
    """`points` steps from -1 to 1, evenly spaced (0 alone for one point)."""
    return [-1 + 2 * i / (points - 1) for i in range(points)] if points > 1 else [0.0]


def landscape(model, train, device: torch.device, budget: Budget, seed: int) -> dict[str, Any]:
    """The loss along the first direction, and where `budget.plane` asks, over the plane of the first two
    (rows: the second direction's steps), the same seed's directions in both."""
    alphas = span(budget.points)
    found = {"alpha": alphas, "loss": probes.loss_surface(model, train, device, [(a,) for a in alphas], seed)}
    if budget.plane:
        grid = span(budget.plane)
        flat = probes.loss_surface(model, train, device, [(a, b) for b in grid for a in grid], seed)
        found["plane"] = {
            "step": grid,
            "loss": [flat[row * len(grid) : (row + 1) * len(grid)] for row in range(len(grid))],
        }
    return found


def ratio(norms: list[float]) -> float:
    """The first 3x3 layer's gradient norm over the last one's."""
    return norms[0] / norms[-1] if norms and norms[-1] > 0 else math.nan


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| net | state | iteration | mean response std | grad first/last, initial | grad first/last, trained | "
        "test err % | worst single lesion err % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["residual"], r["depth"])):
        single = [value for value in r["lesion"]["single"] if not math.isnan(value)]
        lines.append(
            f"| {r['net']} | {r['state']} | {r['iteration']} | {sum(r['responses']) / len(r['responses']):.3f} | "
            f"{ratio(r['gradients']['initial']):.3g} | {ratio(r['gradients']['trained']):.3g} | "
            f"{r['lesion']['error']:.2f} | {max(single) if single else math.nan:.2f} |"
        )
    return "\n".join([*lines, "", f"Responses: {POOLING}.", ""])


def label(r: dict[str, Any]) -> str:
    """The net, and the run's directory where it says more (a sweep's resnet56-A_seed3)."""
    name = Path(r["run"]).name
    return r["net"] if name == r["net"] else f"{r['net']} ({name})"


def figures(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """responses.png (Fig. 7: by layer index, and sorted by magnitude), gradients.png, lesions.png and
    landscape.png; plain nets dashed, residual nets solid, one colour per run."""
    drawn = []

    def save(figure: Figure, stem: str) -> None:
        figure.tight_layout()
        drawn.append(save_figure(figure, out / f"{stem}.png", dpi=120))

    def style(index: int, r: dict[str, Any]) -> dict[str, Any]:
        return {"color": f"C{index % 10}", "linestyle": "-" if r["residual"] else "--", "label": label(r)}

    figure = Figure(figsize=(11, 4))
    by_index, by_size = figure.subplots(1, 2)
    for index, r in enumerate(results):
        layers = range(1, len(r["responses"]) + 1)
        by_index.plot(layers, r["responses"], **style(index, r))
        by_size.plot(layers, sorted(r["responses"], reverse=True), **style(index, r))
    by_index.set(xlabel="layer index (original)", ylabel="std", title="Layer responses (paper Fig. 7, top)")
    by_size.set(xlabel="layer index (sorted by magnitude)", ylabel="std", title="sorted (Fig. 7, bottom)")
    by_index.legend(fontsize=7)
    figure.text(0.5, 0.01, POOLING, ha="center", fontsize=7)
    save(figure, "responses")

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for index, r in enumerate(results):
        kind = style(index, r)
        for when, marker in (("initial", "."), ("trained", "")):
            norms = r["gradients"][when]
            axes.plot(range(1, len(norms) + 1), norms, marker=marker, **{**kind, "label": f"{label(r)}, {when}"})
        logged = r["gradients"]["logged"]
        for point in logged[:: max(1, len(logged) // 4)]:  # a few of the points logged, thin
            norms = point["norms"]
            axes.plot(range(1, len(norms) + 1), norms, linewidth=0.5, alpha=0.5, color=kind["color"])
    axes.set(xlabel="3x3 layer (input side first)", ylabel="gradient norm", yscale="log")
    # the thin lines exist only where a run logged points (grad_norms_every, reached): say so only then
    logged_any = any(r["gradients"]["logged"] for r in results)
    axes.set_title("Gradient flow" + (" (thin: points logged in training, grad_norms_every)" if logged_any else ""))
    axes.legend(fontsize=6)
    save(figure, "gradients")

    figure = Figure(figsize=(11, 4))
    single, random = figure.subplots(1, 2)
    for index, r in enumerate(results):
        lesion = r["lesion"]
        single.plot(range(1, len(lesion["single"]) + 1), lesion["single"], marker=".", **style(index, r))
        random.plot(range(1, len(lesion["random"]) + 1), lesion["random"], marker=".", **style(index, r))
        single.axhline(lesion["error"], color=f"C{index % 10}", linewidth=0.5)
    single.set(xlabel="block deleted", ylabel="test error %", title="One block deleted (thin: none)")
    random.set(xlabel="blocks deleted at random", ylabel="test error %", title="k blocks deleted (Veit et al. 2016)")
    single.legend(fontsize=7)
    save(figure, "lesions")

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for index, r in enumerate(results):
        axes.plot(r["landscape"]["alpha"], r["landscape"]["loss"], **style(index, r))
    axes.set(xlabel="step along a filter-normalised direction", ylabel="training loss", yscale="log")
    axes.set_title("Loss landscape, 1-D (Li et al. 2018)")
    axes.legend(fontsize=7)
    save(figure, "landscape")

    planes = [r for r in results if "plane" in r["landscape"]]
    if planes:
        figure = Figure(figsize=(3.6 * len(planes) + 1, 3.6), layout="constrained")  # room for the colour bar
        logs = [math.log10(max(loss, 1e-12)) for r in planes for row in r["landscape"]["plane"]["loss"] for loss in row]
        levels = [min(logs) + (max(logs) - min(logs)) * i / 20 for i in range(21)] if max(logs) > min(logs) else 20
        for axes, r in zip(figure.subplots(1, len(planes), squeeze=False)[0], planes):
            plane = r["landscape"]["plane"]
            loss = [[math.log10(max(value, 1e-12)) for value in row] for row in plane["loss"]]
            filled = axes.contourf(plane["step"], plane["step"], loss, levels=levels, cmap="viridis")
            axes.contour(plane["step"], plane["step"], loss, levels=levels, colors="white", linewidths=0.3)
            axes.plot([0], [0], "r+")  # the trained weights
            axes.set(title=label(r), xlabel="direction 1", ylabel="direction 2", aspect="equal")
        figure.colorbar(filled, ax=figure.axes, label="log10 training loss (one scale for all)")
        figure.suptitle("Loss landscape, 2-D (Li et al. 2018)", fontsize=9)
        drawn.append(save_figure(figure, out / "landscape-2d.png", dpi=120))
    return drawn


def analyze(
    runs: list[SavedRun], out: Path, device: torch.device, budget: Budget, console: Console | None = None
) -> list[dict[str, Any]]:
    """Measure every run, write analysis.json, analysis.md and the figures into `out`, showing its progress on
    `console` (default: stdout's, as `resexp train` shows its progress; stderr is for an error's one line)."""
    results = []
    with progress(len(runs) * len(STEPS), console or Console(highlight=False)) as step:
        for run in runs:
            name = inline(run.run_dir.name)  # a directory's name may come from anyone: one printable line
            results.append(analyze_run(run, device, budget, lambda what, name=name: step(f"{name}: {what}")))
    with staged(out) as stage:  # all of them, or none: never new files beside older ones
        atomic_write_text(stage / "analysis.json", json.dumps({"pooling": POOLING, "runs": results}, indent=2) + "\n")
        atomic_write_text(stage / "analysis.md", markdown(results))
        figures(results, stage)
    return results
