"""Random CIFAR-shaped images: no files and no download, for smoke runs, tests and benchmarks."""

from __future__ import annotations

import torch

from resexp.data.loaders import PAPER, WHOLE, Data, Preprocessing, Shard, tensor_data


def synthetic(
    *,
    num_classes: int,
    train_size: int,
    test_size: int,
    val_size: int,
    eval_batch_size: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    shard: Shard = WHOLE,
    preprocessing: Preprocessing = PAPER,
) -> Data:
    # Fixed content whatever the run's seed, so that runs differ only in what the seed controls.
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (train_size + test_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (train_size + test_size,), generator=generator)
    return tensor_data(
        images[:train_size],
        labels[:train_size],
        images[train_size:],
        labels[train_size:],
        val_size=val_size,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        device=device,
        shard=shard,
        preprocessing=preprocessing,
    )
