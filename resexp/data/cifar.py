"""CIFAR-10 and CIFAR-100 from the standard python layouts (<root>/cifar-10-batches-py/,
<root>/cifar-100-python/), downloaded when missing. CIFAR-100's images are CIFAR-10's kind (32x32, 50k
training and 10k test images) in 100 classes ("fine" labels), which the relatives' papers also report.

The batches are read directly rather than through torchvision's `CIFAR10` class: that class refuses
files whose md5 differs from the published archive's, and copies rebuilt pixel-exact (such as one made
offline from lossless sources) must still load. The download itself is torchvision's, md5-checked.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resexp.data.loaders import PAPER, WHOLE, Data, Preprocessing, Shard, tensor_data
from resexp.errors import ResexpError


@dataclass(frozen=True)
class Layout:
    """Where a CIFAR set's python version keeps what (torchvision's CIFAR10 and CIFAR100 classes)."""

    name: str  # CIFAR-10, as messages say it
    folder: str  # the python version's folder (torchvision's base_folder)
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    labels: str  # the batch's key of the labels to learn
    classes: int
    images: dict[str, int]  # images in each file (a file of another count is not the set's)
    download: str  # the torchvision class whose url, filename and md5 the download takes


CIFAR10 = Layout(
    "CIFAR-10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "labels",
    10,
    {**{f"data_batch_{i}": 10_000 for i in range(1, 6)}, "test_batch": 10_000},
    "CIFAR10",
)
CIFAR100 = Layout(
    "CIFAR-100",
    "cifar-100-python",
    ("train",),
    ("test",),
    "fine_labels",
    100,
    {"train": 50_000, "test": 10_000},
    "CIFAR100",
)
FOLDER = CIFAR10.folder  # for the tests and messages that name CIFAR-10's folder


# What a batch may be made of: a dict of strings, lists of numbers and one numpy array (the pixels). A
# pickle names the functions it calls to rebuild its objects, and pickle.load calls whatever it names;
# these are the only ones a batch needs (numpy 1's and numpy 2's names, Python 2's bytes).
BATCH_CALLABLES = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class NotABatch(pickle.UnpicklingError):
    """A pickle that names a callable no CIFAR-10 batch needs."""


class BatchUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 batch as data only: `data.root` is often a shared folder, and a crafted batch
    file could otherwise run any code as it loads (a pickle's __reduce__)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in BATCH_CALLABLES:
            raise NotABatch(f"{module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path, layout: Layout = CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch as uint8 images (N, 3, 32, 32) and int64 labels, read as data only
    (BatchUnpickler), or a one-line error."""
    try:
        with open(path, "rb") as file:
            entry = BatchUnpickler(file, encoding="latin1").load()
        count = layout.images[path.name]
        labels = np.asarray(entry[layout.labels]).reshape(count)
        images = np.asarray(entry["data"]).reshape(count, 3, 32, 32)
    except NotABatch as error:
        raise ResexpError(
            f"{path} is not a {layout.name} batch: it would call {error} as it loads, and resexp reads the batches "
            "as data only, never as code; replace it with a good copy"
        ) from None
    except Exception as error:  # a truncated or foreign pickle fails in many ways; all mean the same here
        raise ResexpError(
            f"{path} is corrupt or truncated ({type(error).__name__}: {error}); "
            "delete the folder to download it again, or copy a good file there"
        ) from None
    # Whole numbers in range, checked before they are cast: 256 would wrap to 0, a label of 2.5 become 2.
    if images.dtype.kind not in "ui" or images.min() < 0 or images.max() > 255:
        raise ResexpError(f"{path} has pixels that are not whole numbers in 0..255: it is not a {layout.name} batch")
    if labels.dtype.kind not in "ui":
        raise ResexpError(f"{path} has labels that are not whole numbers: it is not a {layout.name} batch")
    if labels.min() < 0 or labels.max() >= layout.classes:
        raise ResexpError(f"{path} has labels outside 0..{layout.classes - 1}: it is not a {layout.name} batch")
    return torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64))


def find_or_download(root: str, download: bool, layout: Layout = CIFAR10) -> Path:
    folder = Path(root).expanduser().absolute() / layout.folder  # absolute: the message says where it looked
    missing = [name for name in layout.train_files + layout.test_files if not (folder / name).is_file()]
    if not missing:
        return folder
    how = (
        f"put the python version of {layout.name} there ({layout.folder}/) or point data.root (or RESEXP_DATA) "
        "at a folder that holds it"
    )
    if not download:
        raise ResexpError(f"{layout.name} not found: {folder} lacks {', '.join(missing)}; {how}")
    import torchvision.datasets  # torchvision's import takes a second: only when downloading
    from torchvision.datasets.utils import download_and_extract_archive

    source = getattr(torchvision.datasets, layout.download)
    try:
        download_and_extract_archive(source.url, str(folder.parent), filename=source.filename, md5=source.tgz_md5)
    except Exception as error:  # offline, proxy, disk full, bad checksum: the user needs the same advice
        raise ResexpError(f"{layout.name} not found in {folder} and the download failed ({error}); {how}") from None
    return folder


def load(
    layout: Layout,
    *,
    root: str,
    download: bool,
    num_classes: int,
    val_size: int,
    eval_batch_size: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    shard: Shard = WHOLE,
    preprocessing: Preprocessing = PAPER,
) -> Data:
    """The set's training and test images as batches on the device (resexp/data/loaders.py)."""
    if num_classes != layout.classes:
        raise ResexpError(f"data.num_classes={num_classes}, but {layout.name} has {layout.classes} classes")
    folder = find_or_download(root, download, layout)
    train = [read_batch(folder / name, layout) for name in layout.train_files]
    test = [read_batch(folder / name, layout) for name in layout.test_files]
    return tensor_data(
        torch.cat([images for images, _ in train]),
        torch.cat([labels for _, labels in train]),
        torch.cat([images for images, _ in test]),
        torch.cat([labels for _, labels in test]),
        val_size=val_size,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        device=device,
        shard=shard,
        preprocessing=preprocessing,
    )


def cifar10(**settings: Any) -> Data:
    """CIFAR-10 (§4.2): load's arguments."""
    return load(CIFAR10, **settings)


def cifar100(**settings: Any) -> Data:
    """CIFAR-100, fine labels: load's arguments."""
    return load(CIFAR100, **settings)
