import csv
import json
import re

import pytest
from helpers import SHRINK, compose_config, fake_run, resexp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resexp import config
from resexp.config import net_spec
from resexp.errors import ResexpError
from resexp.paper import RESULTS, lookup, recipe_differences
from resexp.report import report
from resexp.runs import read_run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def sweep(tmp_path):
    """Figure 6 in miniature: plain-20/56 and ResNet-20/56 with two seeds each, ResNet-110 with three."""
    root = tmp_path / "sweep"
    finals = {
        ("plain", 20): [(3.8, 10.2), (4.2, 10.4)],
        ("plain", 56): [(13.0, 18.0), (14.0, 18.6)],
        ("resnet", 20): [(2.5, 8.6), (2.7, 8.8)],
        ("resnet", 56): [(0.6, 6.9), (0.8, 7.1)],
        ("resnet", 110): [(0.3, 6.4), (0.4, 6.6), (0.5, 6.8)],
    }
    for (kind, depth), runs in finals.items():
        for seed, (train, test) in enumerate(runs):
            fake_run(
                root / f"{kind}{depth}-seed{seed}",
                depth=depth,
                residual=kind == "resnet",
                final_train=train,
                final_test=test,
                seed=seed,
            )
    return root


def rows_by_net(rows):
    return {row.net: row for row in rows}


def test_groups_seeds_into_mean_std_and_best_with_the_papers_numbers(sweep):
    rows = rows_by_net(report([sweep]))
    assert list(rows) == ["plain20", "plain56", "resnet20-A", "resnet56-A", "resnet110-A"]  # the paper's order
    r110 = rows["resnet110-A"]
    assert r110.runs == 3
    assert r110.test == pytest.approx((6.6, 0.2))  # mean and sample std of 6.4, 6.6, 6.8
    assert r110.lowest == pytest.approx(6.4)
    assert r110.paper.error == 6.43 and r110.paper.mean == 6.61 and r110.paper.std == 0.16
    assert r110.difference == pytest.approx(6.6 - 6.61)  # against the paper's mean of 5 runs
    assert rows["resnet20-A"].difference == pytest.approx(8.7 - 8.75)
    assert rows["resnet20-A"].paper.source == "Table 6"
    plain = rows["plain56"]
    assert plain.paper.error is None and plain.difference is None and "Fig. 6 only" in plain.paper.source
    assert plain.train == pytest.approx((13.5, 0.7071), abs=1e-3)


def test_writes_tables_and_the_figure(sweep):
    report([sweep])
    text = (sweep / "results.md").read_text()
    assert "| cifar10 | resnet110-A | A |" in text and "6.60±0.20" in text and "6.43, 6.61±0.16 mean" in text
    assert "Fig. 6 only (no number)" in text
    with open(sweep / "results.csv") as file:
        table = {row["net"]: row for row in csv.DictReader(file)}
    assert float(table["resnet56-A"]["test_error_mean"]) == pytest.approx(7.0)
    assert table["resnet56-A"]["paper_error"] == "6.97" and table["plain20"]["paper_error"] == ""
    assert (sweep / "figure6.png").read_bytes().startswith(PNG)
    assert (sweep / "figure6.svg").read_text().count("<path") > 10  # both panels' curves are drawn


def test_imagenet_runs_report_top5_beside_the_papers(tmp_path):
    for seed, (top1, top5) in enumerate([(25.5, 8.0), (26.5, 8.4)]):
        fake_run(
            tmp_path / f"r34-{seed}",
            depth=34,
            residual=True,
            final_train=20,
            final_test=top1,
            final_top5=top5,
            seed=seed,
            data="imagenet",
            shortcut="projection",
            iterations=600_000,
        )
    [row] = report([tmp_path])
    assert (row.net, row.runs) == ("resnet34-B", 2)
    assert row.test == pytest.approx((26.0, 0.7071), abs=1e-3) and row.top5 == pytest.approx((8.2, 0.2828), abs=1e-3)
    assert row.difference == pytest.approx(26.0 - 24.52)  # Table 3, option B
    assert "26.00±0.71, top-5 8.20±0.28" in (tmp_path / "results.md").read_text()
    assert "24.52, top-5 7.46 (Table 3)" in (tmp_path / "results.md").read_text()
    with open(tmp_path / "results.csv") as file:
        [entry] = list(csv.DictReader(file))
    assert float(entry["test_top5_mean"]) == pytest.approx(8.2) and entry["paper_top5"] == "7.46"
    assert (tmp_path / "figure4.png").read_bytes().startswith(PNG)


def test_unfinished_and_broken_runs_are_listed_not_averaged(sweep):
    fake_run(sweep / "resnet20-stopped", depth=20, residual=True, final_train=50, final_test=50, finished=False)
    truncated = fake_run(sweep / "resnet20-truncated", depth=20, residual=True, final_train=50, final_test=50)
    truncated.joinpath("metrics.json").write_text('{"net": "resnet20-A", "final": {"error/te')
    (sweep / "plain20-empty" / ".hydra").mkdir(parents=True)
    (sweep / "plain20-empty" / ".hydra" / "config.yaml").write_text("model: {depth: 20, residual: false}\n")
    rows = rows_by_net(report([sweep]))
    assert rows["resnet20-A"].runs == 2 and rows["resnet20-A"].test[0] == pytest.approx(8.7)  # the 50% runs stay out
    text = (sweep / "results.md").read_text()
    assert "resnet20-stopped` (resnet20-A): stopped at iteration 32,000 of 64,000, checkpoint saved" in text
    assert "resnet20-truncated` (resnet20-A): metrics.json is truncated or malformed" in text
    assert "plain20-empty` (plain20): ended before its first checkpoint" in text


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(ResexpError, match="no runs under"):
        report([tmp_path])
    result = resexp("report", str(tmp_path / "missing"), cwd=tmp_path)
    assert result.returncode == 2 and "is not a directory of runs" in result.stderr


def test_report_of_real_short_runs(tmp_path):
    sweep = tmp_path / "sweep"
    trained = resexp("train", "-m", *SHRINK, "model=plain20,resnet20", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    result = resexp("report", str(sweep), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 finished runs in 2 groups" in result.stdout
    text = (sweep / "results.md").read_text()
    assert (
        "| synthetic | plain20 | - | 269,722 | 1 |" in text and "| synthetic | resnet20-A | A | 269,722 | 1 |" in text
    )
    assert (sweep / "figure_synthetic.png").read_bytes().startswith(PNG)
    # TensorBoard: the HPARAMS tab and the side-by-side custom scalars view.
    run = next(sweep.glob("*resnet20*"))
    events = EventAccumulator(str(run))
    events.Reload()
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    assert "custom_scalars__config__" in events.PluginTagToContent("custom_scalars")


def paper_rows(data: str, table: int) -> set[str]:
    """The nets that resexp/paper.py gives a number of Table `table` for ("Table 6", "Tables 2 and 3")."""
    cites = re.compile(rf"Tables? (\d and )?{table}\b")
    return {net for (dataset, net), result in RESULTS.items() if dataset == data and cites.match(result.source)}


# He et al. 2016's Table 3: each net with the 2015 units and with pre-activation.
HE_2016 = {net for (_, net), result in RESULTS.items() if result.source.startswith("He et al. 2016, Table 3")}
# Fig. 6 (left and middle): plain and residual 20, 32, 44 and 56 layers, and ResNet-110 (its right panel,
# ResNet-1202, is Table 6's).
FIG6 = {f"plain{depth}" for depth in (20, 32, 44, 56)} | {f"resnet{depth}-A" for depth in (20, 32, 44, 56, 110)}


@pytest.mark.parametrize(
    "experiment, nets, data, iterations",
    [
        ("cifar10_fig6", FIG6, "cifar10", 64_000),
        ("cifar10_table6", paper_rows("cifar10", 6), "cifar10", 64_000),
        ("imagenet_table2", paper_rows("imagenet", 2), "imagenet", 600_000),
        ("imagenet_table3", paper_rows("imagenet", 3), "imagenet", 600_000),
        ("cifar10_preact", HE_2016 | {"resnet110-A"}, "cifar10", 64_000),  # 110's 2015 units: Table 6's
    ],
)
def test_experiment_presets_sweep_the_papers_nets(experiment, nets, data, iterations):
    preset = config.compose(f"experiment={experiment}", hydra_node=True)
    assert preset.hydra.runtime.choices.data == data and preset.schedule.iterations == iterations
    swept = []
    for model in preset.hydra.sweeper.params.model.split(","):  # each run: the preset's data, the paper's schedule
        run = compose_config(f"experiment={experiment}", f"model={model}")
        assert run.data._target_ == f"resexp.data.{data}" and run.schedule.iterations == iterations
        swept.append(net_spec(run).name)
    assert len(swept) == len(set(swept)) and set(swept) == nets  # the paper's nets, each once


def test_the_gating_preset_sweeps_resnet110_with_and_without_its_gates_each_with_its_number():
    preset = config.compose("experiment=cifar10_gating", hydra_node=True)
    params = preset.hydra.sweeper.params
    swept = [
        net_spec(compose_config("experiment=cifar10_gating", f"model={params.model}", f"shortcut={shortcut}")).name
        for shortcut in params.shortcut.split(",")
    ]
    assert swept == ["resnet110-A", "resnet110-gated"]  # He et al. 2016's Table 1: its first and best gated rows
    assert all(lookup("cifar10", name) is not None for name in swept)


def test_the_relatives_sweep_each_net_once_with_its_authors_recipe_and_number():
    preset = config.compose("experiment=cifar10_relatives", hydra_node=True)
    seen = {}
    for model in preset.hydra.sweeper.params.model.split(","):
        run = compose_config("experiment=cifar10_relatives", f"model={model}")
        name = net_spec(run).name
        recipe = (run.schedule.iterations, run.schedule.batch_size, run.optim.lr)
        # each net's number is compared only with a run of the recipe it was reported with
        assert recipe_differences("cifar10", name, *recipe) == []
        seen[name] = recipe
    assert list(seen) == [
        "resnet110-A",
        "resnet164-B-preact",
        "wrn16-8-B-preact",
        "wrn28-10-B-preact",
        "resnext29-8x64d-B-preact",
        "densenet-bc100-12",
    ]
    assert seen["densenet-bc100-12"] == (234_375, 64, 0.1) and lookup("cifar10", "densenet-bc100-12").error == 4.51
    assert seen["wrn28-10-B-preact"] == (78_125, 128, 0.1) and seen["resnext29-8x64d-B-preact"] == (58_594, 256, 0.1)
    resnext = lookup("cifar10", "resnext29-8x64d-B-preact").error
    assert (lookup("cifar10", "wrn28-10-B-preact").error, resnext) == (4.00, 3.65)
    assert lookup("cifar10", "resnext29-8x64d-B") is None  # their released code's blocks: no number published
    # the 2015 recipe is another recipe for a Wide ResNet, and the WRN's for a 2015 net
    assert recipe_differences("cifar10", "wrn28-10-B-preact", 64_000, 128, 0.1) == ["64,000 iterations (paper 78,125)"]
    assert recipe_differences("cifar10", "resnet110-A", 78_125, 128, 0.1) == ["78,125 iterations (paper 64,000)"]


def test_imagenet_table3_rows_are_the_papers():
    names = [
        net_spec(compose_config("experiment=imagenet_table3", f"model={model}")).name
        for model in "resnet34,resnet34-B,resnet34-C,resnet50,resnet101,resnet152".split(",")
    ]
    assert names == ["resnet34-A", "resnet34-B", "resnet34-C", "resnet50-B", "resnet101-B", "resnet152-B"]
    assert all(lookup("imagenet", name).source.startswith(("Table 3", "Tables 2 and 3")) for name in names)


def test_experiment_sweep_runs_from_the_command_line(tmp_path):
    result = resexp(
        "train",
        "-m",
        "experiment=cifar10_table6",
        "model=resnet20",
        *SHRINK,
        f"hydra.sweep.dir={tmp_path / 's'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    metrics = [json.loads(p.read_text()) for p in (tmp_path / "s").glob("*/metrics.json")]
    assert [m["net"] for m in metrics] == ["resnet20-A"]  # the command line narrows the preset's sweep


def test_runs_trained_otherwise_are_marked_not_compared(tmp_path):
    fake_run(tmp_path / "short", depth=20, residual=True, final_train=30, final_test=40, iterations=2000, batch_size=32)
    fake_run(tmp_path / "paper", depth=20, residual=True, final_train=1, final_test=8.5)
    short, paper = sorted(report([tmp_path]), key=lambda row: bool(row.recipe), reverse=True)
    assert short.recipe == ("2,000 iterations (paper 64,000)", "batch 32 (paper 128)") and short.difference is None
    assert paper.recipe == () and paper.difference == pytest.approx(8.5 - 8.75)  # the same net, two rows
    text = (tmp_path / "results.md").read_text()
    assert "| 2,000 iterations (paper 64,000); batch 32 (paper 128) |" in text and "| the paper's |" in text
    assert "not compared with its numbers" in text


def test_figure_titles_say_what_the_runs_are(tmp_path):
    from resexp.plots import title

    short = fake_run(tmp_path / "a", depth=20, residual=True, final_train=30, final_test=40, iterations=2000)
    paper = fake_run(tmp_path / "b", depth=20, residual=False, final_train=1, final_test=9)
    random = fake_run(tmp_path / "c", depth=20, residual=False, final_train=1, final_test=9, data="synthetic")
    assert title("cifar10", [read_run(paper)]) == "CIFAR-10 (paper Fig. 6)"
    assert title("cifar10", [read_run(short)]) == "CIFAR-10, like paper Fig. 6 but 2,000 iterations (paper 64,000)"
    assert title("synthetic", [read_run(random)]) == "random images (data=synthetic)"


def test_pre_activation_runs_are_compared_with_he_et_al_2016_and_their_2015_twins_too(tmp_path):
    bottleneck = {"block": "bottleneck", "bottleneck_stride": "1x1"}
    for name, keys, test in (
        ("pre", {**bottleneck, "preactivation": True}, 5.5),
        ("orig", {**bottleneck, "preactivation": False}, 6.0),
        ("old", {"block": "bottleneck"}, 6.1),  # before 0.4.0: no stride, no units recorded
    ):
        fake_run(tmp_path / name, depth=164, residual=True, shortcut="projection", final_train=1.0,
                 final_test=test, model_keys=keys)  # fmt: skip
    rows = rows_by_net(report([tmp_path]))
    assert sorted(rows) == ["resnet164-B", "resnet164-B-preact", "resnet164-B-v1.5"]
    assert rows["resnet164-B-preact"].paper.error == 5.46 and "2016" in rows["resnet164-B-preact"].paper.source
    assert rows["resnet164-B"].difference == pytest.approx(6.0 - 5.93)
    assert rows["resnet164-B-v1.5"].paper is None  # torchvision's block: no paper trained it


def test_the_figure_tells_a_depths_units_apart(tmp_path):
    bottleneck = {"block": "bottleneck", "bottleneck_stride": "1x1"}
    for name, preact in (("orig", False), ("pre", True)):
        fake_run(tmp_path / name, depth=164, residual=True, shortcut="projection", final_train=1.0,
                 final_test=6.0, model_keys={**bottleneck, "preactivation": preact})  # fmt: skip
    report([tmp_path])
    svg = (tmp_path / "figure6.svg").read_text()
    assert "<!-- ResNet-164 pre-act -->" in svg and "<!-- ResNet-164 -->" in svg  # the legend's texts, as paths


def test_the_figures_legend_names_each_net_as_its_paper_does():
    def legend(*overrides: str, letter: bool = False) -> str:
        return net_spec(compose_config(*overrides)).legend(letter)

    assert legend("model=resnet164-preact") == "ResNet-164 pre-act"
    assert legend("model=resnet34", "shortcut=B", letter=True) == "ResNet-34 (B)"  # Table 3's A, B and C side by side
    assert legend("model=plain20", letter=True) == "plain-20"
    assert legend("model=wrn28-10", "model.dropout=0.3") == "WRN-28-10 pre-act dropout 0.3"
    assert legend("model=resnext29-8x64d", "model.preactivation=false", letter=True) == "ResNeXt-29-8x64d (B)"
    assert legend("model=resnet110", "shortcut=gated", letter=True) == "ResNet-110 gated"


def test_a_pre_activation_run_of_resexp_0_8_is_named_apart_from_the_authors_net(tmp_path):
    keys = {"block": "bottleneck", "bottleneck_stride": "1x1", "preactivation": True}
    for version, where in (("0.8.0", "older"), ("0.9.0", "newer")):
        run = fake_run(tmp_path / where, depth=164, residual=True, final_train=1, final_test=5.5,
                       shortcut="projection", model_keys=keys)  # fmt: skip
        metrics = json.loads((run / "metrics.json").read_text())
        (run / "metrics.json").write_text(json.dumps({**metrics, "resexp": version}))
    rows = rows_by_net(report([tmp_path]))
    assert set(rows) == {"resnet164-B-preact", "resnet164-B-preact-resexp-0.8"}
    assert rows["resnet164-B-preact"].paper.error == 5.46  # He et al. 2016's, compared with the authors' net alone
    assert rows["resnet164-B-preact-resexp-0.8"].paper is None
