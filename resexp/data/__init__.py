"""Data builders: each returns a `Data` (training batches and evaluation sets) from plain arguments."""

from __future__ import annotations

from typing import Any

from resexp.data.cifar import cifar10, cifar100
from resexp.data.loaders import Data, Preprocessing, Shard
from resexp.data.synthetic import synthetic


def imagenet(**settings: Any) -> Data:
    """ImageNet from class folders (resexp/data/imagenet_folders.py: its arguments there). Imported here,
    on first use: torchvision's decoders and transforms (over a second of start-up) load for ImageNet runs only."""
    from resexp.data.imagenet_folders import imagenet as build

    return build(**settings)


def imagenet_packed(**settings: Any) -> Data:
    """ImageNet (or Imagenette) as packed by `resexp prepare` (resexp/data/packed.py: its arguments there)."""
    from resexp.data.packed import imagenet_packed as build

    return build(**settings)


__all__ = ["Data", "Preprocessing", "Shard", "cifar10", "cifar100", "imagenet", "imagenet_packed", "synthetic"]
