"""Data builders: each returns a `Data` (training batches and evaluation sets) from plain arguments."""

from resexp.data.cifar import cifar10
from resexp.data.imagenet import imagenet
from resexp.data.loaders import Data
from resexp.data.synthetic import synthetic

__all__ = ["Data", "cifar10", "imagenet", "synthetic"]
