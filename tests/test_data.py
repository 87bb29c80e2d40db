import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resexp.data import cifar, cifar10, synthetic
from resexp.data.loaders import Images, per_pixel_mean, tensor_loaders
from resexp.errors import ResexpError

SMALL = dict(num_classes=10, train_size=300, test_size=100, workers=0, eval_batch_size=50, batch_size=32, seed=0)


def write_batch(path, images, labels):
    with open(path, "wb") as file:
        pickle.dump({"batch_label": "test", "labels": labels, "data": images.reshape(len(labels), -1)}, file)


@pytest.fixture
def fake_cifar(tmp_path):
    """A complete cifar-10-batches-py/ of small random batches, in the standard python layout."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in cifar.TRAIN_FILES + cifar.TEST_FILES:
        write_batch(folder / name, rng.integers(0, 256, (10_000, 3072), dtype=np.uint8), rng.integers(0, 10, 10_000).tolist())
    return tmp_path


def test_reads_the_standard_layout_without_md5_checks(fake_cifar):
    data = cifar10(root=str(fake_cifar), download=False, num_classes=10, val_size=0, workers=0, eval_batch_size=1000, batch_size=128, seed=0)
    assert data.num_train == 50_000
    assert len(data.evals["test"].dataset) == 10_000
    x, y = next(iter(data.train))
    assert x.shape == (128, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_missing_data_names_the_folder_and_how_to_provide_it(tmp_path):
    with pytest.raises(ResexpError) as error:
        cifar10(root=str(tmp_path), download=False, num_classes=10, val_size=0, workers=0, eval_batch_size=1, batch_size=1, seed=0)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "data_batch_1" in message and "data.root" in message
    assert "\n" not in message


def test_failed_download_is_one_clear_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(ResexpError, match="the download failed \\(network is unreachable\\); put the python version"):
        cifar10(root=str(tmp_path), download=True, num_classes=10, val_size=0, workers=0, eval_batch_size=1, batch_size=1, seed=0)


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


def test_real_copy_loads(cifar_root):
    images, labels = cifar.read_batch(cifar_root / "cifar-10-batches-py" / "test_batch")
    assert images.shape == (10_000, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10
    # PROVENANCE.txt: test per-channel mean (0.4942, 0.4851, 0.4504).
    assert images.float().mean((0, 2, 3)).div(255).tolist() == pytest.approx([0.4942, 0.4851, 0.4504], abs=1e-3)


def test_augmentation_is_a_padded_crop_of_the_mean_subtracted_image_or_its_flip():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    mean = per_pixel_mean(images.repeat(2, 1, 1, 1) // 2)
    centred = images[0].float() / 255 - mean
    padded = F.pad(centred, (4, 4, 4, 4))  # zero padding: the mean value after subtraction
    views = {(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)}
    seen = set()
    dataset = Images(images, torch.zeros(1, dtype=torch.int64), mean, augment=True)
    for _ in range(400):
        x, _ = dataset[0]
        match = [v for v in views if torch.allclose(x, crop(padded, *v))]
        assert match, "an augmented image is no crop of the padded image or of its flip"
        seen.update(match)
    assert len(seen) > 100  # offsets and flips both vary
    assert {flip for _, _, flip in seen} == {False, True}
    plain, _ = Images(images, torch.zeros(1, dtype=torch.int64), mean, augment=False)[0]
    assert torch.allclose(plain, centred)  # evaluation: the single original view


def crop(padded, dy, dx, flip):
    view = padded[:, dy : dy + 32, dx : dx + 32]
    return view.flip(-1) if flip else view


def test_per_pixel_mean_is_the_mean_image():
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(per_pixel_mean(images), images.float().mean(0) / 255, atol=1e-6)


def test_validation_split_holds_out_images_and_the_mean_ignores_them():
    data = synthetic(**SMALL, val_size=60)
    assert data.num_train == 240 and len(data.evals["val"].dataset) == 60 and len(data.evals["test"].dataset) == 100
    train_set, val_set = data.train.dataset, data.evals["val"].dataset
    train_rows = {tuple(image.flatten().tolist()[:16]) for image in train_set.images}
    assert not any(tuple(image.flatten().tolist()[:16]) in train_rows for image in val_set.images)
    assert torch.allclose(train_set.mean, per_pixel_mean(train_set.images))
    assert data.evals["val"].dataset.mean is train_set.mean  # val and test are centred with the training mean


def test_no_split_by_default_and_epochs_are_permutations():
    data = synthetic(**SMALL, val_size=0)
    assert set(data.evals) == {"test"}
    first = torch.cat([y for _, y in data.train])
    assert len(first) == 288  # 9 full batches of 32; the last partial batch is dropped
    order = [torch.cat([y for _, y in data.train]) for _ in range(2)]
    assert not torch.equal(order[0], order[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_the_seed_fixes_data_order_and_augmentation(workers):
    def first_batch(seed):
        # Without workers the crops draw from the global generator, which `resexp train` seeds first;
        # worker processes are seeded from the loader's own generator.
        torch.manual_seed(seed)
        return next(iter(synthetic(**{**SMALL, "seed": seed, "workers": workers}, val_size=0).train))

    a, b, c = first_batch(1), first_batch(1), first_batch(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(val_size=300), "data.val_size=300 must be between 0 and 299"),
        (dict(batch_size=0), "batch sizes must be positive"),
        (dict(batch_size=500), "batch size 500 is larger than the 300 training images"),
    ],
)
def test_bad_loader_values(changes, message):
    with pytest.raises(ResexpError, match=message):
        synthetic(**{**SMALL, "val_size": 0, **changes})


def test_tensor_loaders_keep_labels_with_images():
    images = torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1).expand(64, 3, 32, 32).contiguous()
    labels = torch.arange(64)
    data = tensor_loaders(images, labels, images[:8], labels[:8], val_size=0, batch_size=16, eval_batch_size=8, workers=0, seed=0)
    mean = data.train.dataset.mean
    for x, y in data.train:
        # Crops can bring in padding, but the centre pixel is always the image's own.
        centre = (x[:, 0, 16, 16] + mean[0, 16, 16]) * 255
        assert torch.allclose(centre, y.float(), atol=1e-3)
