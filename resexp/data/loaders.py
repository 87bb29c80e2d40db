"""Image tensors in memory to the loaders a run uses, with the paper's CIFAR preprocessing (§4.2)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from resexp.errors import ResexpError

SPLIT_SEED = 0  # the validation split is the same for every run, whatever its seed


@dataclass
class Data:
    train: DataLoader  # augmented training batches; a fresh permutation each epoch
    evals: dict[str, DataLoader]  # "test", and "val" with a split: the single original view
    num_train: int  # images trained on


class Images(Dataset):
    """uint8 images (N, 3, H, W) served as floats with the per-pixel mean subtracted; optionally the
    paper's augmentation: 4 pixels padded on each side, a random crop of the original size, a random
    horizontal flip. The mean is subtracted first, so the padding is the mean image's value (zero)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, augment: bool) -> None:
        self.images, self.labels, self.mean = images, labels, mean
        size = images.shape[-1]
        self.augment = v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]) if augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index].float().div_(255).sub_(self.mean)
        if self.augment is not None:
            x = self.augment(x)
        return x, self.labels[index]


def per_pixel_mean(images: torch.Tensor) -> torch.Tensor:
    """The mean image (3, H, W) in [0, 1] of the training images in use (§4.2)."""
    return (images.sum(0, dtype=torch.float64) / (255 * len(images))).float()


def tensor_loaders(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    val_size: int,
    batch_size: int,
    eval_batch_size: int,
    workers: int,
    seed: int,
) -> Data:
    """Loaders over in-memory uint8 images; `val_size` training images become the validation set."""
    if not 0 <= val_size < len(train_labels):
        raise ResexpError(f"data.val_size={val_size} must be between 0 and {len(train_labels) - 1}")
    if batch_size < 1 or eval_batch_size < 1:
        raise ResexpError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
    if batch_size > len(train_labels) - val_size:
        raise ResexpError(f"batch size {batch_size} is larger than the {len(train_labels) - val_size} training images")
    evals = {}
    if val_size:
        order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
        held, kept = order[-val_size:], order[:-val_size]
        val = (train_images[held], train_labels[held])
        train_images, train_labels = train_images[kept], train_labels[kept]
    mean = per_pixel_mean(train_images)
    evals["test"] = (test_images, test_labels)
    if val_size:
        evals["val"] = val
    # More workers than CPUs only slows the training threads down.
    workers = min(workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    train = DataLoader(
        Images(train_images, train_labels, mean, augment=True),
        batch_size=batch_size,
        shuffle=True,  # sampling without replacement: each epoch sees every image once
        drop_last=True,  # every step sees a full batch, as the paper's iteration counts assume
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),  # data order and worker seeds follow the run's seed
        pin_memory=torch.cuda.is_available(),
    )
    return Data(
        train=train,
        evals={
            name: DataLoader(Images(x, y, mean, augment=False), batch_size=eval_batch_size)
            for name, (x, y) in evals.items()
        },
        num_train=len(train_labels),
    )
