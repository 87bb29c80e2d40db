"""Packed ImageNet (resexp prepare, data=imagenet_packed): the files prepare writes from real and made-up
images, resuming, damaged files, the augmentation drawn on the device, and a run that resumes exactly."""

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, assert_resumes_bit_identical, resexp
from PIL import Image
from torchvision.datasets import ImageFolder

from resexp.data.crops import FLIP, SIDE, crop_fractions, draw_windows, sample_windows, ten_windows
from resexp.data.decode import read_image
from resexp.data.imagenet_folders import centre_crop
from resexp.data.loaders import Shard
from resexp.data.packed import imagenet_packed, paths
from resexp.errors import ResexpError
from resexp.prepare import folder_sources, pack, prepare

S = 32  # the squares' side in these tests; R = 28
SETTINGS = dict(
    num_classes=104, scale=[256, 480], crop=224, test_size=256, lighting_std=0.1, mean=[0.485, 0.456, 0.406]
)


@pytest.fixture(scope="module")
def root(tmp_path_factory, imagenet_sample) -> Path:
    """An ImageNet root whose train/ and val/ are both the 104-image sample."""
    root = tmp_path_factory.mktemp("imagenet")
    for split in ("train", "val"):
        (root / split).symlink_to(imagenet_sample / "val")
    return root


@pytest.fixture(scope="module")
def packed(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed")
    prepare(str(root), out, S, workers=2, skip_bad=False, show=False)
    return out


def load(packed: Path, **changes):
    args = dict(
        root=str(packed), size=S, placement="auto", eval_batch_size=16, batch_size=8, seed=0, device=torch.device("cpu")
    )
    return imagenet_packed(**{**SETTINGS, **args, **changes})


def arrays(out: Path, split: str, size: int = S) -> tuple[np.ndarray, np.ndarray]:
    files = paths(out, split, size)
    labels = np.frombuffer(files["labels"].read_bytes(), dtype="<i8")
    return np.frombuffer(files["images"].read_bytes(), dtype=np.uint8).reshape(-1, 3, size, size), labels


def test_prepare_packs_the_folder_readers_images_labels_and_classes(root, packed):
    folder = ImageFolder(str(root / "train"))
    images, labels = arrays(packed, "train")
    manifest = json.loads(paths(packed, "train", S)["manifest"].read_text())
    assert manifest["classes"] == folder.classes and manifest["images"] == manifest["slots"] == len(folder) == 104
    assert labels.tolist() == [label for _, label in folder.samples]
    assert sum(manifest["per_class"].values()) == 104 and manifest["size"] == S
    for index in (0, 17, 103):  # grayscale and tiny ones are among the sample's
        reference = centre_crop(read_image(folder.samples[index][0]), S, S)  # data=imagenet's validation view at S
        assert torch.equal(torch.from_numpy(images[index].copy()), reference)
    assert manifest["images_sha256"] == hashlib.sha256(images.tobytes()).hexdigest()


def made_images(folder: Path) -> dict[str, Path]:
    """Two classes of images of the kinds ImageNet holds: RGB, CMYK and greyscale JPEGs, a PNG named .JPEG,
    and a truncated JPEG."""
    rng = np.random.default_rng(0)
    made = {}
    for kind, cls in [("rgb", "a"), ("cmyk", "a"), ("grey", "b"), ("png", "b"), ("truncated", "b")]:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        buffer = io.BytesIO()
        if kind == "cmyk":
            image.convert("CMYK").save(buffer, "JPEG")
        elif kind == "grey":
            image.convert("L").save(buffer, "JPEG")
        elif kind == "png":
            image.save(buffer, "PNG")
        else:
            image.save(buffer, "JPEG")
        data = buffer.getvalue()
        made[kind] = folder / cls / f"{kind}.JPEG"
        made[kind].write_bytes(data[: len(data) // 3] if kind == "truncated" else data)
    return made


def test_other_kinds_of_images_are_converted_and_a_broken_one_is_named_or_skipped(tmp_path):
    for split in ("train", "val"):
        made = made_images(tmp_path / "src" / split)
    result = resexp(
        "prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--size", "16", "--workers", "0", cwd=tmp_path
    )
    assert_one_line_error(result, str(tmp_path / "src" / "train" / "b" / "truncated.JPEG"), "--skip-bad")
    assert not paths(tmp_path / "out", "train", 16)["manifest"].exists()  # nothing reads as prepared
    result = resexp("prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--size", "16", "--skip-bad", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train: 4 images in 2 classes, 1 skipped" in result.stdout
    manifest = json.loads(paths(tmp_path / "out", "val", 16)["manifest"].read_text())
    assert manifest["skipped"] == [str(made["truncated"])] and manifest["per_class"] == {"a": 2, "b": 2}
    images, labels = arrays(tmp_path / "out", "val", 16)
    samples = folder_sources(tmp_path / "src")[1].samples
    for index, (path, label) in enumerate(samples):
        if Path(path) == made["truncated"]:
            assert labels[index] == -1
            continue
        assert labels[index] == label
        assert torch.equal(torch.from_numpy(images[index].copy()), centre_crop(read_image(path), 16, 16))
    data = load(tmp_path / "out", size=16, num_classes=2, batch_size=2)
    assert data.num_train == 4 and all((y >= 0).all() for _, y in data.evals["val"])


def test_a_stopped_prepare_resumes_and_ends_as_one_that_ran_through(root, packed, tmp_path, monkeypatch):
    source = folder_sources(root)[0]
    broken, (good, label) = tmp_path / "broken.JPEG", source.samples[60]
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    samples = [*source.samples[:60], (str(broken), label), *source.samples[61:]]
    source = type(source)(source.name, source.split, samples, source.classes)
    with pytest.raises(ResexpError, match="broken.JPEG"):
        pack(source, tmp_path, S, workers=0, skip_bad=False, chunk=10, show=False)
    progress = json.loads((tmp_path / f"train-{S}.progress").read_text())
    assert sorted(progress["done"]) == [0, 10, 20, 30, 40, 50]  # the chunks before the broken one
    broken.write_bytes(Path(good).read_bytes())  # the user replaces the file
    decoded = []
    monkeypatch.setattr("resexp.prepare.pack_chunk", counting(decoded))
    pack(source, tmp_path, S, workers=0, skip_bad=False, chunk=10, show=False)  # the same images: resumed
    assert sorted(decoded) == [60, 70, 80, 90, 100]
    assert arrays(tmp_path, "train")[0].tobytes() == arrays(packed, "train")[0].tobytes()
    ours, theirs = (json.loads(paths(p, "train", S)["manifest"].read_text()) for p in (tmp_path, packed))
    assert ours["images_sha256"] == theirs["images_sha256"] and not (tmp_path / f"train-{S}.progress").exists()
    other = type(source)(source.name, source.split, source.samples[:50], source.classes)
    decoded.clear()
    pack(other, tmp_path, S, workers=0, skip_bad=False, chunk=10, show=False)  # other images: starts over
    assert sorted(decoded) == [0, 10, 20, 30, 40] and arrays(tmp_path, "train")[0].shape[0] == 50


@pytest.mark.slow
def test_a_killed_prepare_resumes_and_ends_as_one_that_ran_through(root, packed, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    command = [sys.executable, "-m", "resexp", "prepare", str(root), str(out), "--size", str(S), "--chunk", "2"]
    process = subprocess.Popen(
        [*command, "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    record = out / f"train-{S}.progress"
    deadline = time.monotonic() + 120
    while not (record.exists() and len(json.loads(record.read_text())["done"]) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the command and its worker, at once
    process.wait()
    assert not paths(out, "train", S)["manifest"].exists()  # nothing reads as prepared
    done = len(json.loads(record.read_text())["done"])
    resumed = subprocess.run([*command, "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    for split in ("train", "val"):
        assert arrays(out, split)[0].tobytes() == arrays(packed, split)[0].tobytes()
        assert arrays(out, split)[1].tobytes() == arrays(packed, split)[1].tobytes()
    assert 3 <= done < 52 and not record.exists()


def counting(decoded: list):
    from resexp import prepare as module

    real = module.pack_chunk

    def pack_chunk(task):
        decoded.append(task[1])
        return real(task)

    return pack_chunk


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "foreign manifest", "no manifest", "link"])
def test_a_damaged_packed_file_is_one_line(packed, tmp_path, damage):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in packed.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    files = paths(copy, "train", S)
    if damage == "flipped byte":
        data = bytearray(files["images"].read_bytes())
        data[12345] ^= 1
        files["images"].write_bytes(bytes(data))
    elif damage == "truncated":
        files["images"].write_bytes(files["images"].read_bytes()[:-7])
    elif damage == "foreign manifest":
        files["manifest"].write_text(json.dumps({"format": "numpy-pickle", "__reduce__": "os.system"}))
    elif damage == "no manifest":
        files["manifest"].unlink()
    else:
        files["images"].unlink()
        os.symlink(packed / files["images"].name, files["images"])
    said = {
        "flipped byte": "does not match its manifest's SHA-256",
        "truncated": "holds",
        "foreign manifest": "not a manifest of resexp prepare",
        "no manifest": "resexp prepare",
        "link": "symbolic link",
    }[damage]
    with pytest.raises(ResexpError, match=said) as error:
        load(copy)
    assert "\n" not in str(error.value) and str(files["manifest" if "manifest" in damage else "images"]) in str(
        error.value
    )


def test_window_draws_span_the_papers_scales_uniformly_and_independently():
    generator = torch.Generator().manual_seed(0)
    drawn = draw_windows(40_000, (256, 480), 224, 0.1, generator)
    low, high = crop_fractions((256, 480), 224)
    side = drawn[:, SIDE]
    assert side.min() >= low - 1e-6 and side.max() <= high + 1e-6
    lengths = torch.round(224 / side)
    counts = torch.histc(lengths, bins=4, min=256, max=481)  # L uniform over the 225 integers
    assert torch.all((counts / counts.sum() - 0.25).abs() < 0.01), counts
    assert abs(drawn[:, FLIP].mean() - 0.5) < 0.01
    assert torch.all((drawn[:, 1:3] >= 0) & (drawn[:, 1:3] <= 1 - side[:, None] + 1e-6))
    pairs = torch.corrcoef(torch.stack([side[:-1], side[1:], drawn[:-1, FLIP], drawn[1:, FLIP]]))
    assert pairs[0, 1].abs() < 0.03 and pairs[2, 3].abs() < 0.03  # one image's draw says nothing of the next's
    again = draw_windows(40_000, (256, 480), 224, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)
    halves = [
        draw_windows(8, (256, 480), 224, 0.1, torch.Generator().manual_seed(3), Shard(rank, 2)) for rank in (0, 1)
    ]
    assert torch.equal(torch.cat(halves), draw_windows(8, (256, 480), 224, 0.1, torch.Generator().manual_seed(3)))


def test_the_largest_window_is_the_pixels_themselves_and_a_mirror_reads_them_backwards():
    squares = torch.randint(0, 256, (3, 3, S, S), dtype=torch.uint8)
    size, corner = 28, torch.tensor([0, 4, 3])
    drawn = torch.zeros(3, 7, dtype=torch.float64)
    drawn[:, SIDE], drawn[:, 1], drawn[:, 2] = size / S, corner / S, torch.tensor([2, 0, 4]) / S
    drawn[2, FLIP] = 1
    out = sample_windows(squares, drawn, size)
    for k, (top, left) in enumerate(zip(corner.tolist(), [2, 0, 4])):
        window = squares[k, :, top : top + size, left : left + size].double()
        assert torch.allclose(out[k], window.flip(-1) if k == 2 else window, atol=1e-9)
    views = ten_windows(squares, size)
    assert views.shape == (3, 10, 3, size, size) and torch.equal(views[:, 5:], views[:, :5].flip(-1))


def test_shards_of_two_ranks_serve_one_processs_batches(packed):
    whole = load(packed).train
    ranks = [load(packed, shard=Shard(rank, 2)).train for rank in (0, 1)]
    for _ in range(15):  # 13 batches an epoch: into the second
        x, y = next(whole)
        parts = [next(rank) for rank in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([rank.drawn for rank in ranks]), whole.drawn)


@pytest.mark.slow
def test_a_packed_run_trains_stops_and_resumes_bit_identically(tmp_path, packed):
    net = ["model=resnet18", "data=imagenet_packed", f"data.root={packed}", f"data.size={S}"]
    net += ["data.num_classes=104", "data.eval_batch_size=52", "schedule.batch_size=8", "schedule.iterations=30"]
    net += ["schedule.milestones=[15,22]"]
    assert_resumes_bit_identical(tmp_path, net)


def test_imagenette_is_read_through_torchvision_from_its_folder(tmp_path):
    from torchvision.datasets import Imagenette

    wnids = sorted(Imagenette._WNID_TO_CLASS)[:2]
    for split in ("train", "val"):
        for wnid in wnids:
            folder = tmp_path / "out" / "download" / "imagenette2-160" / split / wnid
            folder.mkdir(parents=True)
            for k in range(3):
                Image.fromarray(np.full((20, 30, 3), 40 * k, dtype=np.uint8)).save(folder / f"{k}.JPEG")
    result = resexp("prepare", "imagenette", str(tmp_path / "out"), "--size", "16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads(paths(tmp_path / "out", "train", 16)["manifest"].read_text())
    assert manifest["classes"] == wnids and manifest["source"] == "imagenette-160px" and manifest["images"] == 6


@pytest.mark.gpu
def test_on_cuda_the_packed_step_is_one_graph_and_held_in_host_memory_trains_the_same(tmp_path, packed, monkeypatch):
    """The window sampling captured with the net (one GraphedStep), and the squares in GPU memory or pinned
    host memory (each batch copied over) giving the same run bit for bit (deterministic, fp32)."""
    from helpers import RUN, assert_same_run

    from resexp import jobs

    built, make = [], jobs.make_step
    monkeypatch.setattr(jobs, "make_step", lambda *args, **kwargs: built.append(make(*args, **kwargs)) or built[-1])
    net = ["model=resnet18", "data=imagenet_packed", f"data.root={packed}", f"data.size={S}", "data.num_classes=104"]
    net += ["schedule.batch_size=32", "device=cuda", "deterministic=true", "precision=fp32"]
    for placement in ("device", "host"):
        result = resexp(
            "train", *RUN, *net, f"data.placement={placement}", f"hydra.run.dir={tmp_path / placement}", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
    assert [type(step).__name__ for step in built] == ["GraphedStep", "GraphedStep"]
    assert_same_run(tmp_path / "device", tmp_path / "host")
    eager = resexp("train", *RUN, *net, "cuda_graph=false", f"hydra.run.dir={tmp_path / 'eager'}", cwd=tmp_path)
    assert eager.returncode == 0, eager.stderr
    errors = [
        json.loads((tmp_path / run / "metrics.json").read_text())["final"]["error/train"] for run in ("device", "eager")
    ]
    assert errors[0] == pytest.approx(errors[1], abs=5.0)  # the same crops and flips, float rounding apart


def test_report_marks_packed_runs_as_another_recipe_and_draws_their_figure_4(tmp_path):
    from helpers import fake_run

    from resexp.report import report

    sweep = tmp_path / "sweep"
    for kind, depth, train, test in [
        ("plain", 18, 40, 45),
        ("plain", 34, 42, 47),
        ("resnet", 18, 38, 44),
        ("resnet", 34, 33, 40),
    ]:
        keys = {"stem": "imagenet"}
        fake_run(sweep / f"{kind}{depth}", depth=depth, residual=kind == "resnet", final_train=train, final_test=test,
                 data="imagenet_packed", iterations=600_000, batch_size=256, model_keys=keys)  # fmt: skip
        saved = sweep / f"{kind}{depth}" / ".hydra" / "config.yaml"
        saved.write_text(saved.read_text() + "data:\n  size: 128\n")
    rows = {row.net: row for row in report([sweep])}
    assert set(rows) == {"plain18", "plain34", "resnet18-A", "resnet34-A"}
    assert all(row.recipe == ("packed 128x128 squares (paper: 224 crops of full images)",) for row in rows.values())
    assert rows["resnet34-A"].paper.error == 25.03 and rows["resnet34-A"].difference is None  # shown, not compared
    assert (sweep / "figure4_packed.png").stat().st_size > 10_000


def test_a_served_batch_becomes_the_nets_input_through_the_transform(packed):
    data = load(packed)
    x, y = data.training_input()
    assert x.dtype == torch.float32 and x.shape == (8, 3, 28, 28) and y.shape == (8,)
    squares, _ = next(data.train)
    assert squares.dtype == torch.uint8 and squares.shape == (8, 3, S, S) and data.image_shape == (3, S, S)
    val, _ = next(iter(data.evals["val"]))
    ten, _ = next(iter(data.final["test"]))
    assert val.shape == (16, 3, 28, 28) and ten.shape == (16, 10, 3, 28, 28)
    assert torch.equal(ten[:, 4], val)  # the fifth of the ten views is the centre one


def test_squares_that_do_not_fit_the_gpu_stay_in_host_memory_or_are_one_line(monkeypatch, caplog):
    from resexp.data import packed

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * 2**30, 80 * 2**30))
    gpu = torch.device("cuda")
    assert packed.choose_holder(10 * 2**30, gpu, "auto") == gpu
    assert packed.choose_holder(15 * 2**30, gpu, "auto").type == "cpu" and "pinned host memory" in caplog.text
    with pytest.raises(ResexpError, match=r"15.0 GiB.*20.0 GiB free.*--size"):
        packed.choose_holder(15 * 2**30, gpu, "device")
    assert packed.choose_holder(1, gpu, "host").type == "cpu"


def test_too_little_disk_space_is_one_line_before_anything_is_written(root, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    result = resexp("prepare", str(root), str(tmp_path / "out"), "--size", "16", cwd=tmp_path)
    assert_one_line_error(result, "0.0 GiB free", "need", "--size")
    assert not any((tmp_path / "out").iterdir())


def test_the_small_stem_keeps_the_papers_stages_at_small_inputs():
    from resexp.models.resnet import ResNet

    small, paper = (ResNet([2, 2, 2, 2], stem=stem, num_classes=10) for stem in ("small", "imagenet"))
    x = torch.randn(1, 3, 56, 56)
    assert small.stages(small.stem(x)).shape[-1] == 7  # the paper's nets at 224: 56, 28, 14, 7
    assert paper.stages(paper.stem(x)).shape[-1] == 2
    from resexp.models.names import net_name

    assert net_name(True, 18, "identity", stem="small") == "resnet18-A-stem3x3"
