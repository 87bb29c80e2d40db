"""`resexp report DIR...`: the runs under some directories as the paper's tables and figures.

Runs are grouped by dataset and net (several seeds: mean ± std and best), compared with the paper's
number (resexp/paper.py), printed, and written as results.md and results.csv beside the runs, with the
Figure 6 (CIFAR-10) or Figure 4 (ImageNet) style plot. A run that did not finish is listed as such,
with how far it got, and never averaged in.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from resexp.errors import ResexpError
from resexp.files import atomic_write_text, staged
from resexp.paper import PaperResult, lookup, recipe_differences
from resexp.runs import HYDRA, METRICS, Run, experiment, find_runs, read_run
from resexp.tags import TEST_ERROR, TEST_TOP5, TRAIN_ERROR


@dataclass
class Row:
    """One net on one dataset, over its finished runs."""

    data: str
    net: str
    depth: int | None
    residual: bool
    shortcut: str  # the paper's letter (A, B, C), "-" for plain nets and nets without shortcut options
    params: int | None
    runs: int
    iterations: int | None  # the recipe the runs share: rows of one net differ here, or in the recipe column
    batch_size: int | None
    train: tuple[float, float]  # final training error: mean, std
    test: tuple[float, float]  # final test error: mean, std
    lowest: float  # the lowest final test error among the runs (metrics.json's "best" is another thing: the
    # lowest error a run reached during its training)
    paper: PaperResult | None
    top5: tuple[float, float] | None = None  # final top-5 test error (ImageNet): mean, std
    recipe: tuple[str, ...] = ()  # how the runs' recipe differs from the paper's: () where it is the paper's

    @property
    def difference(self) -> float | None:
        """Our mean test error minus the paper's (its mean of several runs where it gives one); None where
        the paper has no number, or the runs were trained otherwise (shorter, another batch, other data)."""
        if self.paper is None or self.paper.error is None or self.recipe:
            return None
        return self.test[0] - (self.paper.mean if self.paper.mean is not None else self.paper.error)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[Run]) -> list[Row]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.finished:
            groups.setdefault(experiment(run), []).append(run)
    rows = []
    for (data, net, *_), members in groups.items():
        tests = [run.final[TEST_ERROR] for run in members]
        trains = [run.final.get(TRAIN_ERROR, float("nan")) for run in members]
        top5 = [run.final[TEST_TOP5] for run in members if TEST_TOP5 in run.final]
        first = members[0]
        rows.append(
            Row(
                data=data,
                net=net,
                depth=first.depth,
                residual=bool(first.residual),
                shortcut=first.letter,
                params=first.params,
                runs=len(members),
                iterations=first.iterations,
                batch_size=first.batch_size,
                train=mean_std(trains),
                test=mean_std(tests),
                lowest=min(tests),
                paper=lookup(data, net),
                top5=mean_std(top5) if len(top5) == len(members) else None,
                recipe=tuple(
                    recipe_differences(
                        data, net, first.iterations, first.batch_size, first.lr, first.size, first.preprocess
                    )
                ),
            )
        )
    # Plain before residual, shallow before deep, as the paper's tables read.
    return sorted(rows, key=lambda row: (row.data, row.residual, row.depth or 0, row.net, row.recipe))


def paper_text(result: PaperResult | None) -> str:
    if result is None:
        return "-"
    if result.error is None:
        return result.source
    spread = f", {result.mean:.2f}±{result.std:.2f} mean" if result.mean is not None else ""
    top5 = f", top-5 {result.top5:.2f}" if result.top5 is not None else ""
    return f"{result.error:.2f}{spread}{top5} ({result.source})"


def plus_minus(pair: tuple[float, float], runs: int) -> str:
    return f"{pair[0]:.2f}±{pair[1]:.2f}" if runs > 1 else f"{pair[0]:.2f}"


COLUMNS = [
    "data",
    "net",
    "shortcut",
    "params",
    "runs",
    "iterations",
    "batch",
    "train err %",
    "test err %",
    "lowest run test %",
    "paper %",
    "Δ vs paper",
    "recipe",
]


def cells(row: Row) -> list[str]:
    difference = f"{row.difference:+.2f}" if row.difference is not None else "-"
    params = f"{row.params:,}" if row.params else "?"
    test = plus_minus(row.test, row.runs) + (f", top-5 {plus_minus(row.top5, row.runs)}" if row.top5 else "")
    return [
        row.data,
        row.net,
        row.shortcut,
        params,
        str(row.runs),
        f"{row.iterations:,}" if row.iterations else "?",
        str(row.batch_size or "?"),
        plus_minus(row.train, row.runs),
        test,
        f"{row.lowest:.2f}",
        paper_text(row.paper),
        difference,
        "; ".join(row.recipe) or "the paper's",
    ]


def inline(text: str) -> str:
    """`text` on one line of Markdown or a terminal, whatever a run directory's name holds: control characters
    (a newline would start a line of its own, an escape sequence would move the cursor) written as escapes,
    and backticks (which end inline code) as quotes."""
    return "".join("'" if c == "`" else c if c.isprintable() else repr(c)[1:-1] for c in text)


def markdown(rows: list[Row], left_out: list[Run]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    if any(row.recipe for row in rows):
        lines += ["", "Rows trained otherwise than the paper (the recipe column) are not compared with its numbers."]
    if left_out:
        lines += ["", "Left out:", ""] + [
            f"- `{inline(str(run.path))}` ({run.net}): {inline(run.note)}" for run in left_out
        ]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "data",
            "net",
            "depth",
            "shortcut",
            "params",
            "runs",
            "iterations",
            "batch_size",
            "train_error_mean",
            "train_error_std",
            "test_error_mean",
            "test_error_std",
            "test_error_lowest_run",
            "paper_error",
            "paper_mean",
            "paper_source",
            "difference",
            "test_top5_mean",
            "test_top5_std",
            "paper_top5",
            "recipe",
        ]
    )
    for row in rows:
        paper = row.paper or PaperResult(None, "")
        writer.writerow(
            [
                row.data,
                row.net,
                row.depth,
                row.shortcut,
                row.params,
                row.runs,
                row.iterations,
                row.batch_size,
                *row.train,
                *row.test,
                row.lowest,
                paper.error,
                paper.mean,
                paper.source,
                row.difference,
                *(row.top5 or (None, None)),
                paper.top5,
                "; ".join(row.recipe),
            ]
        )
    return out.getvalue()


def report(directories: list[Path], out: Path | None = None, console: Console | None = None) -> list[Row]:
    """Print the table, write results.md, results.csv and the figure to `out` (default: the first directory)."""
    console = console or Console(width=None if Console().is_terminal else 200)  # logs: no wrapped table
    runs = [read_run(path) for path in find_runs(directories)]
    if not runs:
        raise ResexpError(
            f"no runs under {', '.join(map(str, directories))} (a run directory holds {HYDRA}/config.yaml or {METRICS})"
        )
    rows, left_out = summarize(runs), [run for run in runs if not run.finished]
    table = Table(title=f"{len(runs) - len(left_out)} finished runs in {len(rows)} groups")
    for column in COLUMNS:
        table.add_column(
            column, justify="left" if column in ("data", "net", "shortcut", "paper %", "recipe") else "right"
        )
    for row in rows:
        table.add_row(*map(Text, cells(row)))  # text, never markup
    console.print(table)
    if other := sum(bool(row.recipe) for row in rows):
        console.print(
            f"[yellow]{other} of {len(rows)} rows[/] trained otherwise than the paper (the recipe column): not compared with its numbers"
        )
    for run in left_out:
        console.print(f"[yellow]left out[/] {escape(inline(str(run.path)))} ({run.net}): {escape(inline(run.note))}")

    out = out or directories[0]
    from resexp.plots import comparison_figure  # matplotlib only when a figure is drawn

    with staged(out) as stage:  # all of them, or none: never new files beside older ones
        atomic_write_text(stage / "results.md", markdown(rows, left_out))
        atomic_write_text(stage / "results.csv", csv_text(rows))
        figures = comparison_figure([run for run in runs if run.finished], stage)
    for figure in figures:
        console.print(f"figure: {escape(inline(str(out / figure.name)))}")
    console.print(f"tables: {escape(inline(str(out / 'results.md')))}, {escape(inline(str(out / 'results.csv')))}")
    return rows
