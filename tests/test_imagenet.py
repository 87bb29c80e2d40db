"""The ImageNet pipeline on 104 real ILSVRC-2012 JPEGs (one per class for 104 classes, grayscale and
tiny ones included): decoding, the paper's augmentation, 10-crop testing, exact resume, bad folders."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import resexp
from torch import nn

from resexp import checkpoint
from resexp.data import imagenet
from resexp.data.crops import EIGENVALUES, EIGENVECTORS, lighting
from resexp.errors import ResexpError
from resexp.evaluate import evaluate

SMALL = dict(scale=[40, 64], crop=32, test_size=40)  # the paper's 256-480/224/256, scaled down for the CPU
SMALL_ARGS = ["data.scale=[40,64]", "data.crop=32", "data.test_size=40"]


@pytest.fixture
def sample(imagenet_sample) -> Path:
    return imagenet_sample


@pytest.fixture
def root(tmp_path, sample) -> Path:
    """An ImageNet root whose train/ and val/ are both the sample."""
    (tmp_path / "imagenet").mkdir()
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split).symlink_to(sample / "val")
    return tmp_path / "imagenet"


def load(root: Path, **changes):
    train = root / "train"
    args = dict(
        root=str(root),
        num_classes=len([path for path in train.iterdir() if path.is_dir()]) if train.is_dir() else 104,
        lighting_std=0.1,
        mean=[0.485, 0.456, 0.406],
        workers=0,
        eval_batch_size=16,
        batch_size=8,
        seed=0,
        device=torch.device("cpu"),
        **SMALL,
    )
    return imagenet(**{**args, **changes})


def take(batches, count):
    return [next(batches) for _ in range(count)]


def test_every_image_decodes_into_the_papers_views(root):
    data = load(root)
    epoch = take(data.train, 104 // 8)  # one epoch, no image left over
    assert all(x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 for x, _ in epoch)
    labels = torch.cat([y for _, y in epoch])
    assert sorted(labels.tolist()) == list(range(104))  # a permutation: every image once per epoch
    assert data.image_shape == (3, 32, 32) and data.num_train == 104 and data.top5
    val, test = list(data.evals["val"]), list(data.final["test"])
    assert sum(len(y) for _, y in val) == sum(len(y) for _, y in test) == 104
    assert val[0][0].shape == (16, 3, 32, 32) and test[0][0].shape == (16, 10, 3, 32, 32)
    # Centre crop and ten crops of the same resized image: the fifth crop is the centre one.
    assert torch.equal(test[0][0][:, 4], val[0][0])
    # The last five are the mirror image's corners and centre: its top-left corner is the top-right one mirrored.
    assert torch.equal(test[0][0][:, 5], test[0][0][:, 1].flip(-1))


def test_labels_follow_imagenets_class_order(root, sample):
    with open(sample / "class_index.tsv") as file:
        standard = {row["wnid"]: int(row["imagenet_index"]) for row in csv.DictReader(file, delimiter="\t")}
    data = load(root)
    samples = data.evals["val"].loader.dataset.samples
    ranks = {index: rank for rank, index in enumerate(sorted(standard.values()))}
    assert [label for _, label in samples] == [ranks[standard[Path(path).parent.name]] for path, _ in samples]


def test_training_crops_are_random_and_centred_on_the_mean(root):
    data = load(root, lighting_std=0.0)
    x, _ = next(data.train)
    pixels = x + torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    assert pixels.min() >= 0 and pixels.max() <= 1  # only the mean was subtracted
    again = load(root, lighting_std=0.0, seed=1)
    assert not torch.equal(next(again.train)[0], x)


def test_colour_augmentation_shifts_each_image_along_the_principal_components():
    x = torch.rand(64, 3, 4, 4)
    shifted = lighting(x, 0.1, torch.Generator().manual_seed(0))
    offset = shifted - x
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset), atol=1e-6)  # one RGB shift per image
    # The shift, in the eigenvector basis, has std 0.1 x eigenvalue along each component.
    weights = offset[:, :, 0, 0] @ torch.tensor(EIGENVECTORS)  # the eigenvectors are orthonormal columns
    ratio = weights.std(0) / (0.1 * torch.tensor(EIGENVALUES))
    assert torch.all((ratio > 0.7) & (ratio < 1.3)), ratio


def test_the_stream_resumes_exactly_whatever_the_number_of_workers(root):
    straight = take(load(root).train, 16)  # 13 batches an epoch: this crosses into the second
    first = load(root, workers=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(take(first.train, 5), straight))
    path = root.parent / "checkpoint.pt"
    checkpoint.save(path, {"data": first.train.state_dict()})
    resumed = load(root, workers=1)
    resumed.train.load_state_dict(checkpoint.load(path, layout={"data": dict})["data"])  # stored as plain data
    rest = take(resumed.train, 11)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, straight[5:]))


def test_ten_crop_testing_scores_the_mean_of_the_views_softmax():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 7))
    views, labels = torch.randn(5, 10, 3, 4, 4), torch.tensor([0, 1, 2, 3, 4])
    result = evaluate(model, [(views, labels)], torch.device("cpu"))
    with torch.no_grad():
        probabilities = model(views.flatten(0, 1)).softmax(1).view(5, 10, 7).mean(1)
    top5 = probabilities.topk(5, 1).indices
    assert result["error"] == pytest.approx(100 * (probabilities.argmax(1) != labels).float().mean().item())
    assert result["error_top5"] == pytest.approx(100 * (top5 != labels[:, None]).all(1).float().mean().item())
    assert result["loss"] == pytest.approx(-probabilities[range(5), labels].log().mean().item(), rel=1e-5)


def test_bad_folders_say_what_is_wrong(tmp_path, sample):
    with pytest.raises(
        ResexpError, match=r"ImageNet training images not found: .*/nowhere/train is not a folder.*RESEXP_IMAGENET"
    ):
        load(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    for split in ("train/n01440764", "val/n01440764"):
        (empty / split).mkdir(parents=True)
    with pytest.raises(ResexpError, match=r"ImageNet training images not found in .*/empty/train: .*no valid file"):
        load(empty)
    mixed = tmp_path / "mixed"
    (mixed / "train").mkdir(parents=True)
    shutil.copytree(sample / "val" / "n01440764", mixed / "train" / "n01440764")
    (mixed / "val").symlink_to(sample / "val")
    with pytest.raises(ResexpError, match=r"has classes that .*/mixed/train lacks: n01530575"):
        load(mixed, batch_size=1)
    # The sizes and the worker count are the config edge's to check: tests/test_edge.py.


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_image_is_named_in_one_line(tmp_path, sample, workers):
    root = tmp_path / "corrupt"
    for wnid in ("n01440764", "n01530575", "n01601694"):
        shutil.copytree(sample / "val" / wnid, root / "train" / wnid)
    (root / "val").symlink_to(root / "train")
    broken = next((root / "train").glob("n01530575/*.JPEG"))
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated download
    data = load(root, batch_size=3, workers=workers)
    with pytest.raises(ResexpError) as error:
        take(data.train, 1)
    message = str(error.value)
    assert message.startswith(f"{broken} is not a readable image (") and message.endswith("); remove or replace it")
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)


@pytest.mark.slow
def test_an_imagenet_net_trains_on_imagenet_and_reports_tables_2_and_3(tmp_path, root):
    run = tmp_path / "run"
    result = resexp(
        "train",
        "model=resnet18",
        f"data.root={root}",
        "data.num_classes=104",
        *SMALL_ARGS,
        "data.workers=2",
        "schedule.batch_size=8",
        "schedule.iterations=4",
        "schedule.milestones=[2,3]",
        "log_every=2",
        "eval_points=2",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["data"], metrics["net"], metrics["batch_size"]) == ("imagenet", "resnet18-A", 8)
    assert {"error/val", "error_top5/val", "error/test", "error_top5/test"} <= set(metrics["final"])
    # ten crops once, at the end
    assert metrics["best"]["iteration/val"] in (2, 4) and metrics["best"]["iteration/test"] == 4
    report = resexp("report", str(run), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "27.88 (Table 2)" in report.stdout and "top-5" in report.stdout
    assert (run / "figure4.png").is_file()
    # resexp eval: the centre crops (single view) and the 10-crop testing again, from the checkpoint
    evaluated = resexp("eval", str(run), "--json", "-", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    rows = {row["set"]: row for row in json.loads(evaluated.stdout)}
    assert (rows["val"]["views"], rows["test"]["views"]) == (1, 10)
    for split in ("val", "test"):
        assert rows[split]["error"] == metrics["final"][f"error/{split}"], split
        assert rows[split]["error_top5"] == metrics["final"][f"error_top5/{split}"], split


def test_a_number_of_classes_that_is_not_the_folders_is_one_line(root):
    """More would label images past the classifier; fewer were accepted silently, leaving outputs that no
    image trains."""
    with pytest.raises(
        ResexpError, match=r"data.num_classes=1000, but .*/train has 104 class folders; set data.num_classes=104"
    ):
        load(root, num_classes=1000)


def test_an_image_over_pils_decompression_bomb_limit_is_named_in_one_line(tmp_path, sample, monkeypatch):
    """A format torchvision's decoders lack goes to PIL, which refuses an image of more than twice
    MAX_IMAGE_PIXELS (a decompression bomb): the file is named, as any unreadable one is."""
    from PIL import Image

    root = tmp_path / "bomb"
    for wnid in ("n01440764", "n01530575"):
        shutil.copytree(sample / "val" / wnid, root / "train" / wnid)
    (root / "val").symlink_to(root / "train")
    bomb = root / "train" / "n01440764" / "large.bmp"
    Image.new("RGB", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice that
    data = load(root, batch_size=3, workers=0)
    with pytest.raises(ResexpError) as error:
        for _ in range(3):
            take(data.train, 1)
    assert str(error.value).startswith(f"{bomb} is too large to decode (")
