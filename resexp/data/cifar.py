"""CIFAR-10 from the standard python layout (<root>/cifar-10-batches-py/), downloaded when missing.

The batches are read directly rather than through torchvision's `CIFAR10` class: that class refuses
files whose md5 differs from the published archive's, and copies rebuilt pixel-exact (such as one made
offline from lossless sources) must still load. The download itself is torchvision's, md5-checked.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from resexp.data.loaders import WHOLE, Data, Shard, tensor_data
from resexp.errors import ResexpError

FOLDER = "cifar-10-batches-py"  # the python version's folder (torchvision's CIFAR10.base_folder)
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
IMAGES_PER_FILE = 10_000


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


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickled batch as uint8 images (10000, 3, 32, 32) and int64 labels, read as data only
    (BatchUnpickler), or a one-line error."""
    try:
        with open(path, "rb") as file:
            entry = BatchUnpickler(file, encoding="latin1").load()
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(IMAGES_PER_FILE, 3, 32, 32)
        labels = np.asarray(entry["labels"], dtype=np.int64).reshape(IMAGES_PER_FILE)
    except NotABatch as error:
        raise ResexpError(
            f"{path} is not a CIFAR-10 batch: it would call {error} as it loads, and resexp reads the batches "
            "as data only, never as code; replace it with a good copy"
        ) from None
    except Exception as error:  # a truncated or foreign pickle fails in many ways; all mean the same here
        raise ResexpError(
            f"{path} is corrupt or truncated ({type(error).__name__}: {error}); "
            "delete the folder to download it again, or copy a good file there"
        ) from None
    if labels.min() < 0 or labels.max() > 9:
        raise ResexpError(f"{path} has labels outside 0..9: it is not a CIFAR-10 batch")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def find_or_download(root: str, download: bool) -> Path:
    folder = Path(root).expanduser().absolute() / FOLDER  # absolute: the message says where it looked
    missing = [name for name in TRAIN_FILES + TEST_FILES if not (folder / name).is_file()]
    if not missing:
        return folder
    how = "put the python version of CIFAR-10 there (cifar-10-batches-py/) or point data.root (or RESEXP_DATA) at a folder that holds it"
    if not download:
        raise ResexpError(f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}; {how}")
    from torchvision.datasets import CIFAR10  # torchvision's import takes a second: only when downloading
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR10.url, str(folder.parent), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except Exception as error:  # offline, proxy, disk full, bad checksum: the user needs the same advice
        raise ResexpError(f"CIFAR-10 not found in {folder} and the download failed ({error}); {how}") from None
    return folder


def cifar10(
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
) -> Data:
    if num_classes != 10:
        raise ResexpError(f"data.num_classes={num_classes}, but CIFAR-10 has 10 classes")
    folder = find_or_download(root, download)
    train = [read_batch(folder / name) for name in TRAIN_FILES]
    test = read_batch(folder / TEST_FILES[0])
    return tensor_data(
        torch.cat([images for images, _ in train]),
        torch.cat([labels for _, labels in train]),
        *test,
        val_size=val_size,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        device=device,
        shard=shard,
    )
