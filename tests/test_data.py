import json
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resexp.data import cifar, cifar10, cifar100, synthetic
from resexp.data.loaders import augment, per_pixel_mean, tensor_data
from resexp.errors import ResexpError

SMALL = dict(
    num_classes=10, train_size=300, test_size=100, eval_batch_size=50, batch_size=32, seed=0, device=torch.device("cpu")
)
CPU = torch.device("cpu")


def write_batch(path, images, labels):
    with open(path, "wb") as file:
        pickle.dump({"batch_label": "test", "labels": labels, "data": images.reshape(len(labels), -1)}, file)


@pytest.fixture
def fake_cifar(tmp_path):
    """A complete cifar-10-batches-py/ of small random batches, in the standard python layout."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in cifar.CIFAR10.train_files + cifar.CIFAR10.test_files:
        write_batch(
            folder / name, rng.integers(0, 256, (10_000, 3072), dtype=np.uint8), rng.integers(0, 10, 10_000).tolist()
        )
    return tmp_path


def load_cifar(root, **changes):
    """cifar10() of `root` with small settings; `changes` replace some."""
    settings = dict(download=False, num_classes=10, val_size=0, eval_batch_size=1, batch_size=1, seed=0, device=CPU)
    return cifar10(root=str(root), **{**settings, **changes})


def test_reads_the_standard_layout_without_md5_checks(fake_cifar):
    data = load_cifar(fake_cifar, eval_batch_size=1000, batch_size=128)
    assert data.num_train == 50_000
    assert len(data.evals["test"].labels) == 10_000
    x, y = next(iter(data.train))
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_missing_data_names_the_folder_and_how_to_provide_it(tmp_path):
    with pytest.raises(ResexpError) as error:
        load_cifar(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "data_batch_1" in message and "data.root" in message
    assert "\n" not in message


def test_failed_download_is_one_clear_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(ResexpError, match="the download failed \\(network is unreachable\\); put the python version"):
        load_cifar(tmp_path, download=True)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong shape"])
def test_corrupt_files_are_a_clear_error(fake_cifar, damage):
    path = fake_cifar / "cifar-10-batches-py" / "data_batch_3"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "garbage":
        path.write_bytes(b"not a pickle at all")
    else:
        write_batch(path, np.zeros((10, 3072), np.uint8), [0] * 10)
    with pytest.raises(ResexpError, match=f"{path} is corrupt or truncated"):
        cifar.read_batch(path)


class Payload:
    """What a crafted batch could hold: unpickling it would create a folder (any code could run)."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_batch_that_would_run_code_is_refused_without_running_it(fake_cifar, tmp_path):
    path, target = fake_cifar / "cifar-10-batches-py" / "data_batch_3", tmp_path / "ran"
    with open(path, "wb") as file:
        pickle.dump({"batch_label": "x", "labels": [0] * 10_000, "data": Payload(target)}, file)
    with pytest.raises(ResexpError, match=f"{path} is not a CIFAR-10 batch: it would call .*mkdir") as error:
        cifar.read_batch(path)
    assert "\n" not in str(error.value) and not target.exists()


def test_a_python2_style_batch_still_loads(fake_cifar):
    # Protocol 2 (the original archive's) with numpy's and _codecs' callables, which are data
    path = fake_cifar / "cifar-10-batches-py" / "data_batch_2"
    images = np.random.default_rng(0).integers(0, 256, (10_000, 3072), dtype=np.uint8)
    with open(path, "wb") as file:
        pickle.dump({"batch_label": "b", "labels": [3] * 10_000, "data": images}, file, protocol=2)
    loaded, labels = cifar.read_batch(path)
    assert torch.equal(loaded.flatten(1), torch.from_numpy(images)) and set(labels.tolist()) == {3}


def test_real_copy_loads(cifar_root):
    images, labels = cifar.read_batch(cifar_root / "cifar-10-batches-py" / "test_batch")
    assert images.shape == (10_000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10
    # PROVENANCE.txt: test per-channel mean (0.4942, 0.4851, 0.4504).
    assert images.float().mean((0, 2, 3)).div(255).tolist() == pytest.approx([0.4942, 0.4851, 0.4504], abs=1e-3)


def test_augmentation_is_a_padded_crop_of_the_image_or_its_flip():
    torch.manual_seed(0)
    x = torch.randn(400, 3, 32, 32)
    padded = F.pad(x, (4, 4, 4, 4))  # zero padding: the mean value after mean subtraction
    views = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)]
    out = augment(x, torch.Generator().manual_seed(1))
    seen = []
    for image, source in zip(out, padded):
        match = [v for v in views if torch.equal(image, crop(source, *v))]
        assert match, "an augmented image is no crop of the padded image or of its flip"
        seen.append(match[0])
    dys, dxs, flips = zip(*seen)
    assert set(dys) == set(range(9)) and set(dxs) == set(range(9))  # every offset occurs
    assert 0.4 < sum(flips) / len(flips) < 0.6  # half the images are flipped


def test_augmentation_matches_torchvisions_distribution():
    """The reference: torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, image by image.
    Both must give each of the 162 views (9 x 9 offsets, flipped or not) with probability 1/162."""
    from torchvision.transforms import v2

    torch.manual_seed(0)
    image = torch.randn(1, 3, 32, 32)
    padded = F.pad(image[0], (4, 4, 4, 4))
    views = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)]
    reference = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
    draws = 8100

    index = {crop(padded, *view).contiguous().numpy().tobytes(): i for i, view in enumerate(views)}

    def histogram(images):  # each image found among the views by its exact bytes
        counts = torch.zeros(len(views))
        for out in images:
            counts[index[out.contiguous().numpy().tobytes()]] += 1
        return counts / draws

    ours = histogram(augment(image.expand(draws, -1, -1, -1), torch.Generator().manual_seed(2)))
    theirs = histogram(reference(image[0]) for _ in range(draws))
    # 50 draws per view on average: both within sampling noise of uniform and of each other.
    assert (ours - 1 / 162).abs().max() < 0.005 and (theirs - 1 / 162).abs().max() < 0.005
    assert 0.45 < ours[1::2].sum() < 0.55  # flips


def crop(padded, dy, dx, flip):
    view = padded[:, dy : dy + 32, dx : dx + 32]
    return view.flip(-1) if flip else view


def test_per_pixel_mean_is_the_mean_image():
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(per_pixel_mean(images), images.float().mean(0) / 255, atol=1e-6)


def test_validation_split_holds_out_images_and_the_mean_ignores_them():
    data = synthetic(**SMALL, val_size=60)
    assert data.num_train == 240 and len(data.evals["val"].labels) == 60 and len(data.evals["test"].labels) == 100
    train, val = data.train, data.evals["val"]
    train_rows = {tuple(image.flatten().tolist()[:16]) for image in train.images}
    assert not any(tuple(image.flatten().tolist()[:16]) in train_rows for image in val.images)
    assert torch.allclose(train.mean, per_pixel_mean(train.images))
    assert val.mean is train.mean and data.evals["test"].mean is train.mean  # centred with the training mean


def test_evaluation_sees_every_image_once_in_its_original_view():
    data = synthetic(**SMALL, val_size=0)
    test = data.evals["test"]
    batches = list(test)
    assert [len(y) for _, y in batches] == [50, 50]
    x = torch.cat([x for x, _ in batches])
    assert torch.allclose(x, test.images.float() / 255 - test.mean)


def test_epochs_are_permutations_and_the_last_partial_batch_is_dropped():
    data = synthetic(**SMALL, val_size=0)
    labels = data.train.labels
    seen = []
    for _ in range(9):  # 300 images, batch 32: 9 full batches an epoch
        _, y = next(data.train)
        seen.append(y)
    assert data.train.epoch == 1
    first = data.train.order[:288]
    assert len(set(first.tolist())) == 288 and torch.equal(torch.cat(seen), labels[first])
    previous = data.train.order.clone()
    next(data.train)
    assert data.train.epoch == 2 and data.train.position == 32
    assert sorted(data.train.order.tolist()) == list(range(300)) and not torch.equal(data.train.order, previous)


def test_the_seed_fixes_data_order_and_augmentation():
    def first_batch(seed):
        return next(synthetic(**{**SMALL, "seed": seed}, val_size=0).train)

    a, b, c = first_batch(1), first_batch(1), first_batch(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_the_stream_resumes_exactly_from_its_state():
    stream = synthetic(**SMALL, val_size=0).train
    for _ in range(12):  # into the second epoch
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(10)]
    fresh = synthetic(**SMALL, val_size=0).train
    fresh.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, (next(fresh) for _ in range(10))):
        assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(val_size=300), "data.val_size=300 must be between 0 and 299"),
        (dict(batch_size=500), "batch size 500 is larger than the 300 training images"),
    ],
)
def test_bad_loader_values(changes, message):  # what only the images can tell; the rest: tests/test_edge.py
    with pytest.raises(ResexpError, match=message):
        synthetic(**{**SMALL, "val_size": 0, **changes})


def test_labels_stay_with_their_images():
    images = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1).expand(64, 3, 32, 32).contiguous()
    labels = torch.arange(64)
    data = tensor_data(
        images, labels, images[:8], labels[:8], val_size=0, batch_size=16, eval_batch_size=8, seed=0, device=CPU
    )
    mean = data.train.mean
    for _ in range(8):
        x, y = next(data.train)
        # Crops can bring in padding, but the centre pixel is always the image's own.
        centre = (x[:, 0, 16, 16] + mean[0, 16, 16]) * 255
        assert torch.allclose(centre, y.float(), atol=1e-3)


def write_cifar100(root, labels_high=100):
    """A cifar-100-python/ in the standard python layout: random images, fine and coarse labels."""
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, count in (("train", 50_000), ("test", 10_000)):
        entry = {
            "filenames": [f"{i}.png" for i in range(count)],
            "batch_label": name,
            "fine_labels": rng.integers(0, labels_high, count).tolist(),
            "coarse_labels": rng.integers(0, 20, count).tolist(),
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        }
        with open(folder / name, "wb") as file:
            pickle.dump(entry, file)
    return folder


def load_cifar100(root, num_classes=100):
    """data=cifar100's loaders on `root`, as the config builds them, without a download."""
    return cifar100(
        root=str(root),
        download=False,
        num_classes=num_classes,
        val_size=0,
        eval_batch_size=1000,
        batch_size=64,
        seed=0,
        device=CPU,
    )


def test_cifar100_reads_its_python_layout_with_the_fine_labels(tmp_path):
    folder = write_cifar100(tmp_path)
    data = load_cifar100(tmp_path)
    assert data.num_train == 50_000 and len(data.evals["test"].labels) == 10_000
    with open(folder / "test", "rb") as file:
        fine = torch.tensor(pickle.load(file)["fine_labels"])
    assert torch.equal(data.evals["test"].labels.cpu(), fine)  # the fine labels, in the file's order
    with pytest.raises(ResexpError, match=r"data.num_classes=10, but CIFAR-100 has 100 classes"):
        load_cifar100(tmp_path, num_classes=10)


def test_cifar100_refuses_a_folder_it_cannot_use_in_one_line(tmp_path):
    with pytest.raises(
        ResexpError,
        match=r"CIFAR-100 not found: .*cifar-100-python lacks train, test; put the python version of CIFAR-100",
    ):
        load_cifar100(tmp_path)
    write_cifar100(tmp_path, labels_high=101)  # a label of 100: not one of CIFAR-100's
    with pytest.raises(ResexpError, match=r"has labels outside 0..99: it is not a CIFAR-100 batch"):
        cifar.read_batch(tmp_path / "cifar-100-python" / "train", cifar.CIFAR100)


@pytest.mark.slow
def test_data_cifar100_trains_from_the_command_line(tmp_path):
    from helpers import resexp

    write_cifar100(tmp_path)
    run_dir = tmp_path / "run"
    args = [
        "data=cifar100",
        f"data.root={tmp_path}",
        "schedule.iterations=2",
        "schedule.batch_size=16",
        "eval_points=1",
    ]
    result = resexp("train", *args, "data.eval_batch_size=500", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["data"], metrics["params"]) == (
        "cifar100",
        269_722 + 65 * 90,
    )  # 90 more outputs, 64 weights and a bias each


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": 256}, "has pixels that are not whole numbers in 0..255"),  # would have wrapped to 0
        ({"data": -1}, "has pixels that are not whole numbers in 0..255"),
        ({"fine_labels": 2.5}, "has labels that are not whole numbers"),  # would have become 2
    ],
)
def test_a_batch_of_values_a_cast_would_change_is_refused_not_wrapped(tmp_path, change, message):
    """Pixels above 255 wrapped, and fractional labels were truncated, as they were cast to uint8 and int64."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    count = cifar.CIFAR100.images["test"]
    entry = {"fine_labels": [1] * count, "data": np.zeros((count, 3072), dtype=np.int64)}
    [(key, value)] = change.items()
    if key == "data":
        entry["data"][7, 9] = value
    else:
        entry[key] = [1.0] * (count - 1) + [value]
    with open(folder / "test", "wb") as file:
        pickle.dump(entry, file)
    with pytest.raises(ResexpError, match=message):
        cifar.read_batch(folder / "test", cifar.CIFAR100)
