"""The paper's training curves: Figure 6 (CIFAR-10) and Figure 4 (ImageNet).

One panel for the plain nets and one for the residual nets; error (%) against iterations; dashed
lines the training error, bold lines the test (ImageNet: validation) error; one colour per depth, the
same depth the same colour in both panels, so that the degradation of the plain nets and its absence
in the residual ones read at a glance. Several seeds of a net are averaged.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe on headless machines

from resexp.files import atomic_write
from resexp.paper import DATA_NAMES, recipe_differences
from resexp.runs import Run, experiment
from resexp.tags import TEST_ERROR, TRAIN_ERROR, VAL_ERROR

# Per dataset: the file's name, the paper's figure of these curves, the held-out curve it draws bold.
FIGURES = {
    "cifar10": ("figure6", "Fig. 6", TEST_ERROR),
    "imagenet": ("figure4", "Fig. 4", VAL_ERROR),
    "imagenet_packed": ("figure4_packed", "Fig. 4", VAL_ERROR),  # the paper's experiment on smaller images
    "imagenette": ("figure4_imagenette", "Fig. 4", VAL_ERROR),  # its nets on 10 of ImageNet's classes
}
OTHER = ("figure", None, TEST_ERROR)


def kin(run: Run) -> str:
    """What a run's net is beside its depth (its family's Spec.kin): one colour per depth and kin."""
    return run.spec.kin if run.spec is not None else run.net


def legend_name(run: Run, several_options: bool) -> str:
    """The legend of a run's net, as its family names it (Spec.legend): ResNet-56, plain-20, ResNet-34 (B)
    beside A and C; its name where it has no spec."""
    return run.spec.legend(several_options) if run.spec is not None else run.net


def title(data: str, runs: list[Run]) -> str:
    """What the runs are: their data, the paper's figure where they are its experiment, and how their
    recipe differs from the paper's where it does."""
    figure = FIGURES.get(data, OTHER)[1]
    differences = sorted(
        {
            text
            for run in runs
            for text in recipe_differences(
                data, run.net, run.iterations, run.batch_size, run.lr, run.size, run.preprocess
            )
        }
    )
    name = DATA_NAMES.get(data, data)
    if not differences:
        return f"{name} (paper {figure})"
    shown = [text for text in differences if text != "other data"]
    return f"{name}" + (f", like paper {figure} but " + ", ".join(shown) if figure and shown else "")


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[list[int], list[float]]]:
    """Several seeds' curves of one experiment as one mean curve where they logged the same iterations, else
    each as it is: a curve is never cut to the points that others share."""
    steps = [[step for step, _ in curve] for curve in curves]
    if any(these != steps[0] for these in steps):
        return [([step for step, _ in curve], [value for _, value in curve]) for curve in curves]
    return [(steps[0], [sum(values) / len(values) for values in zip(*([v for _, v in c] for c in curves))])]


def differences(groups: list[list[Run]]) -> list[str]:
    """What tells apart experiments of one net (its iterations, batch, ...): a word for each group's legend,
    "" where there is one group."""
    if len(groups) < 2:
        return [""] * len(groups)
    said = [
        (lambda r: f"{r.iterations:,} it." if r.iterations else "? it."),
        (lambda r: f"batch {r.batch_size}"),
        (lambda r: f"lr {r.lr:g}" if r.lr is not None else "lr ?"),
        (lambda r: f"{r.size}px"),
        (lambda r: "/".join(r.preprocess)),
    ]
    varying = [say for say in said if len({say(group[0]) for group in groups}) > 1]
    return [", ".join(say(group[0]) for say in varying) for group in groups]


def comparison_figure(runs: list[Run], out: Path) -> list[Path]:
    """Draw one figure per dataset among `runs`; returns the PNG paths (an SVG is written beside each). One
    curve per experiment (runs.experiment: its seeds averaged), never several experiments merged."""
    written = []
    by_data: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_data[run.data].append(run)
    for data, members in sorted(by_data.items()):
        stem, _, held_out = FIGURES.get(data, OTHER)
        held_out = held_out if any(held_out in run.curves for run in members) else TEST_ERROR
        by_key: dict[tuple, list[Run]] = defaultdict(list)
        for run in members:
            by_key[experiment(run)].append(run)
        by_net: dict[str, list[list[Run]]] = defaultdict(list)
        for key in sorted(by_key, key=str):
            by_net[by_key[key][0].net].append(by_key[key])
        # one colour per depth and unit (resnet164-B, resnet164-B-preact), and per recipe where a net has several
        order = sorted(by_key, key=lambda key: (by_key[key][0].depth or 0, kin(by_key[key][0]), str(key)))
        colours = {key: f"C{index % 10}" for index, key in enumerate(order)}
        families = [("plain", False), ("ResNet", True)]  # the paper's panel names
        families = [
            (label, residual) for label, residual in families if any(run.residual == residual for run in members)
        ]
        figure = Figure(figsize=(6.6 * len(families), 4.2), layout="constrained")
        axes = figure.subplots(1, len(families), squeeze=False)[0]
        longest = max((step for run in members for curve in run.curves.values() for step, _ in curve), default=1)
        scale = 1e4 if longest >= 2e4 else 1
        highest = 0.0
        for ax, (label, residual) in zip(axes, families):
            nets = sorted(
                (net for net, groups in by_net.items() if groups[0][0].residual == residual),
                key=lambda n: by_net[n][0][0].depth or 0,
            )
            several_options = len({by_net[n][0][0].letter for n in nets} - {"-"}) > 1  # Table 3's A/B/C side by side
            drawn = set()
            for net in nets:
                for group, differs in zip(by_net[net], differences(by_net[net])):
                    name = legend_name(group[0], several_options) + (f" ({differs})" if differs else "")
                    for tag, style, width in ((TRAIN_ERROR, "--", 1.0), (held_out, "-", 2.2)):
                        curves = [run.curves[tag] for run in group if run.curves.get(tag)]
                        for index, (steps, values) in enumerate(mean_curve(curves) if curves else []):
                            highest = max(highest, max(values, default=0))
                            drawn.add(tag)
                            ax.plot(
                                [s / scale for s in steps],
                                values,
                                style,
                                color=colours[experiment(group[0])],
                                linewidth=width,
                                marker="o" if len(steps) == 1 else None,  # a curve of one evaluation is a point
                                label=name if tag == held_out and index == 0 else None,
                            )
            # the paper's panel names, and the other families' whose nets share a panel with them
            firsts = [by_net[net][0][0] for net in nets]
            others = {run.spec.TITLE for run in firsts if run.spec is not None}
            ax.set_title(" and ".join([label, *sorted(others - {""})]))
            ax.set_xlim(0, longest / scale * 1.02)  # from the start of training, as the paper's curves
            ax.set_xlabel("iter. (1e4)" if scale > 1 else "iterations")
            ax.set_ylabel("error (%)")
            ax.grid(alpha=0.3)
            if not ax.get_legend_handles_labels()[0]:  # finished runs whose TensorBoard files were not read
                ax.text(0.5, 0.5, "no curves: the runs' TensorBoard files are missing or unreadable",
                        ha="center", va="center", fontsize="small", transform=ax.transAxes)  # fmt: skip
                continue
            ax.legend(  # beside the panel, never over the curves (high errors fill the whole panel)
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                fontsize="small",
                title=legend_title(drawn, held_out),
                title_fontsize="x-small",
            )
        finals = [run.final.get(tag, 100) for run in members for tag in (TRAIN_ERROR, held_out)]
        for ax in axes:  # the paper's 0-20% once every net has learned (the early epochs run off the top)
            ax.set_ylim(0, 20 if max(finals) < 19 else min(100, highest * 1.05 + 1))
        # wrapped to the figure's width: a sweep of several recipes lists each difference
        figure.suptitle("\n".join(textwrap.wrap(title(data, members), width=75 * len(families))))
        written.append(save_figure(figure, out / f"{stem}{'' if data in FIGURES else '_' + data}.png"))
    return written


def legend_title(drawn: set[str], held_out: str) -> str:
    """What the line styles mean, for the styles a panel draws: a run shorter than log_every has no
    training curve, and a legend must not promise one."""
    said = [f"bold: {'test' if held_out == TEST_ERROR else 'val'}"] if held_out in drawn else []
    return ", ".join(said + (["dashed: train"] if TRAIN_ERROR in drawn else []))


def save_figure(figure: Figure, path: Path, dpi: int = 150) -> Path:
    """`figure` as the PNG `path` and an SVG beside it, each replaced whole (a kill leaves the old one)."""
    for target in (path, path.with_suffix(".svg")):
        atomic_write(target, lambda file, kind=target.suffix[1:]: figure.savefig(file, format=kind, dpi=dpi))
    return path
