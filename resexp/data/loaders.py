"""In-memory images to the batches a run uses, with the paper's CIFAR preprocessing (§4.2).

The uint8 images live on the training device (the GPU when there is one) and each batch is
augmented there in a few tensor ops: no worker processes, no per-image Python. Every random draw,
the epoch permutations and the crops and flips, comes from one generator, so the stream can be
checkpointed and resumed exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from resexp.errors import ResexpError

SPLIT_SEED = 0  # the validation split is the same for every run, whatever its seed
PAD = 4  # §4.2: "4 pixels are padded on each side"


@dataclass(frozen=True)
class Preprocessing:
    """How CIFAR images are centred and padded for their crops: the 2015 paper's (§4.2: the per-pixel mean
    subtracted, 4 pixels of zeros, the mean's value, on each side), or a relative's authors' (conf/preprocess/:
    fb.resnet.torch's per-channel mean and std, which DenseNet's and ResNeXt's code use; Wide ResNet's code
    pads by reflection too)."""

    normalize: str = "mean"  # mean: the per-pixel mean image subtracted; meanstd: each channel's mean and std
    pad: str = "zeros"  # zeros (after centring: the mean) or reflect


NORMALIZATIONS, PADS = ("mean", "meanstd"), ("zeros", "reflect")
PAPER = Preprocessing()


def statistics(images: torch.Tensor, normalize: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What `normalize` centres (and scales) the images by, from the training images in use: the per-pixel
    mean (3, H, W) and no std, or each channel's mean and std (3, 1, 1), in [0, 1] units."""
    if normalize == "mean":
        return per_pixel_mean(images), None
    pixels = images.transpose(0, 1).reshape(3, -1).to(torch.float64) / 255
    mean, std = pixels.mean(1), pixels.std(1)
    return mean.to(torch.get_default_dtype())[:, None, None], std.to(torch.get_default_dtype())[:, None, None]


def per_pixel_mean(images: torch.Tensor) -> torch.Tensor:
    """The mean image (3, H, W) in [0, 1] of the training images in use (§4.2), in torch's default
    float type (float32, unless a float64 reference computation asks for more)."""
    return (images.sum(0, dtype=torch.float64) / (255 * len(images))).to(torch.get_default_dtype())


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) to floats (of the default type) in [0, 1] with the mean subtracted, and divided by
    the std where there is one (Preprocessing's meanstd)."""
    x = images.to(torch.get_default_dtype()).div_(255).sub_(mean)
    return x if std is None else x.div_(std)


@dataclass(frozen=True)
class Shard:
    """Which part of every global batch a process takes (resexp/distributed.py): the `rank`-th of
    `count` equal slices. Every process draws the whole batch's order and augmentation from the same
    generator and keeps its slice, so that the union over processes is the single-process batch."""

    rank: int = 0
    count: int = 1

    def of(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's slice of a global batch's rows."""
        size = len(batch) // self.count
        return batch[self.rank * size : (self.rank + 1) * size]


WHOLE = Shard()  # a process alone: every batch whole


def augment(x: torch.Tensor, generator: torch.Generator, shard: Shard = WHOLE, pad: str = "zeros") -> torch.Tensor:
    """§4.2: pad 4 pixels on each side, crop a random window of the original size from the padded
    image or its horizontal flip; one independent draw per image. x: (B, C, H, W), mean-subtracted,
    so the zero padding is the mean image's value (`pad`=reflect: the image's own pixels mirrored, Wide
    ResNet's); with a `shard`, x is its slice of the global batch, whose draws are all made."""
    batch, channels, height, width = x.shape
    mode = "reflect" if pad == "reflect" else "constant"
    padded = F.pad(x, (PAD, PAD, PAD, PAD), mode=mode)  # (B, C, H + 8, W + 8)
    drawn = batch * shard.count
    dy, dx = shard.of(torch.randint(0, 2 * PAD + 1, (2, drawn), generator=generator, device=x.device).T).T
    flip = shard.of(torch.randint(0, 2, (drawn,), generator=generator, device=x.device).bool())
    rows = dy[:, None] + torch.arange(height, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(width, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # read the window right to left
    images = torch.arange(batch, device=x.device)[:, None, None, None]
    planes = torch.arange(channels, device=x.device)[None, :, None, None]
    return padded[images, planes, rows[:, None, :, None], cols[:, None, None, :]]


class Epochs:
    """Global batches of places in `count` items: each epoch a fresh permutation (sampling without
    replacement), a last batch smaller than `batch_size` dropped, so every step sees a full batch, as the
    paper's iteration counts assume; of each, the `shard`'s slice. The permutations come from `generator`,
    which the batches' augmentation draws from too: the state resumes both."""

    def __init__(self, count: int, batch_size: int, seed: int, device: torch.device, shard: Shard = WHOLE) -> None:
        self.count, self.batch_size, self.shard = count, batch_size, shard
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.int64, device=device)  # this epoch's permutation
        self.position = 0  # places of `order` already served
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def next_places(self) -> torch.Tensor:
        if self.position + self.batch_size > len(self.order):
            self.order = torch.randperm(self.count, generator=self.generator, device=self.order.device)
            self.position, self.epoch = 0, self.epoch + 1
        self.position += self.batch_size
        return self.shard.of(self.order[self.position - self.batch_size : self.position])

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "order": self.order.cpu(),
            "position": self.position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].to(self.order.device)
        self.position, self.epoch = state["position"], state["epoch"]


class TrainBatches(Epochs):
    """Endless augmented training batches of in-memory images (Epochs): `batch_size` is the global
    batch, of which a `shard` is served."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: torch.Tensor,
        batch_size: int,
        seed: int,
        shard: Shard = WHOLE,
        std: torch.Tensor | None = None,
        pad: str = "zeros",
    ) -> None:
        super().__init__(len(labels), batch_size, seed, images.device, shard)
        self.images, self.labels, self.mean, self.std, self.pad = images, labels, mean, std, pad

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.next_places()
        x = normalize(self.images[index], self.mean, self.std)
        return augment(x, self.generator, self.shard, self.pad), self.labels[index]


@dataclass
class EvalSet:
    """A held-out set, seen once per evaluation in its single original view; with a `shard`, the
    process's part of it (every `count`-th batch from its `rank`-th), whose counts resexp.evaluate sums
    over the processes."""

    images: torch.Tensor  # uint8 (N, 3, H, W) on the device
    labels: torch.Tensor  # int64 (N,)
    mean: torch.Tensor  # the training images' mean: test images are centred like the training ones
    batch_size: int
    shard: Shard = WHOLE
    std: torch.Tensor | None = None  # the training images' std per channel, where they are scaled by it

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self.batch_size * self.shard.count
        for start in range(self.shard.rank * self.batch_size, len(self.labels), step):
            end = start + self.batch_size
            yield normalize(self.images[start:end], self.mean, self.std), self.labels[start:end]


class Batches(Protocol):
    """Endless augmented training batches on the device, resumable from their state."""

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Data:
    train: Batches  # augmented training batches, endless and resumable
    # evaluated over the run: "test", and "val" with a split
    evals: dict[str, Iterable[tuple[torch.Tensor, torch.Tensor]]]
    num_train: int  # images trained on
    image_shape: tuple[int, int, int]  # (channels, height, width) of a training image as served
    # evaluated once, at the end
    final: dict[str, Iterable[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    top5: bool = False  # also log the top-5 error (ImageNet)
    # Makes a served training batch the net's input on the device, inside the step (and so inside its CUDA
    # graph): packed ImageNet's crops (resexp/data/packed.py). None: batches are served ready.
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    batch_dtype: torch.dtype | None = None  # the type of a served training batch, where it is not the net's

    def training_input(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next training batch as the net takes it, outside a step (resexp analyze): through
        `transform` where batches are served raw, at once, since a transform reads the batch's draws."""
        x, y = next(self.train)
        return (x if self.transform is None else self.transform(x)), y


def tensor_data(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    val_size: int,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    device: torch.device,
    shard: Shard = WHOLE,
    preprocessing: Preprocessing = PAPER,
) -> Data:
    """Training and evaluation batches over uint8 images, centred and padded as `preprocessing` says;
    `val_size` training images are held out; a `shard` of each global batch of `batch_size`, and of each
    evaluation. The sizes are checked at the
    config edge (resexp/config.py), but for how many images there are."""
    if not 0 <= val_size < len(train_labels):
        raise ResexpError(f"data.val_size={val_size} must be between 0 and {len(train_labels) - 1}")
    if batch_size > len(train_labels) - val_size:
        raise ResexpError(f"batch size {batch_size} is larger than the {len(train_labels) - val_size} training images")
    sets = {"test": (test_images, test_labels)}
    if val_size:
        order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
        held, kept = order[-val_size:], order[:-val_size]
        sets["val"] = (train_images[held], train_labels[held])
        train_images, train_labels = train_images[kept], train_labels[kept]
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    mean, std = statistics(train_images, preprocessing.normalize)
    return Data(
        train=TrainBatches(train_images, train_labels, mean, batch_size, seed, shard, std, preprocessing.pad),
        evals={
            name: EvalSet(x.to(device), y.to(device), mean, eval_batch_size, shard, std)
            for name, (x, y) in sets.items()
        },
        num_train=len(train_labels),
        image_shape=tuple(train_images.shape[1:]),
    )
