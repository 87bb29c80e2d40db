"""ImageNet (ILSVRC-2012) from class folders (<root>/train/<wnid>/*.JPEG, <root>/val/<wnid>/*.JPEG),
with the paper's preprocessing (§3.4).

Training: the shorter side resized to a random length in [256, 480] (scale augmentation), a random
224x224 crop of the image or its horizontal flip, AlexNet's colour augmentation, the mean subtracted.
Every random draw of an image comes from a seed given with its index, so the stream resumes exactly
whatever the number of workers, and both decoders give the same crops (resexp/data/crops.py draws them).
Where the JPEGs are decoded is `decode` (auto: gpu on a CUDA device, cpu elsewhere):

- "cpu": DataLoader workers decode (torchvision's libjpeg-turbo decoder, then a uint8 tensor resize:
  1.6-1.8x PIL's rate per process, measured on the 104 sample JPEGs), resize and crop.
- "gpu": the workers only read each file's bytes and draw its crop; the training process decodes the
  batch on the training device in one call of torchvision's decode_jpeg (nvJPEG on a GPU), then resizes
  and crops each image there. Files that decoder does not take (greyscale, CMYK, progressive, a PNG
  named .JPEG) are decoded by the workers, those alone.

The colour noise and the mean run on the training device either way. Evaluation: the validation set's
centre crops during training (the bold curves of Fig. 4) and, once at the end, the standard 10-crop
testing of Tables 2 and 3 (logged as the test error), decoded where the training images are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2 import functional as F

from resexp.data.crops import apply_crop, draw_crop, lighting
from resexp.data.decode import FolderFiles, device_views, files_batch, read_image
from resexp.data.loaders import WHOLE, Data, Shard, normalize
from resexp.errors import ResexpError


class FolderImages(Dataset):
    """Class-folder images through a transform, decoded here (decode="cpu"). Indexed by (index, seed), the
    transform's random draws come from that seed; indexed by a plain index, the transform must be
    deterministic."""

    def __init__(self, folder: ImageFolder, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.samples, self.transform = folder.samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        path, label = self.samples[index]
        image = read_image(path)
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):  # the caller's generator is left as it was
            torch.manual_seed(seed)  # the draws come from the global generator (resexp.data.crops.draw_crop)
            return self.transform(image), label


class EpochOrder(Sampler):
    """One epoch of (index, seed) pairs from `start` on, in whole global batches of `batch_size`: a
    permutation (sampling without replacement) and one seed per image, both fixed by the run's seed and
    the epoch; of each global batch, the `shard`'s slice."""

    def __init__(self, size: int, seed: int, batch_size: int, shard: Shard = WHOLE) -> None:
        self.size, self.seed, self.batch_size, self.shard = size, seed, batch_size, shard
        self.epoch, self.start = 0, 0

    def positions(self) -> torch.Tensor:
        """The places in the epoch's order that this shard serves from `start` on."""
        batches = (self.size - self.start) // self.batch_size
        places = torch.arange(self.start, self.start + batches * self.batch_size).view(batches, self.batch_size)
        return self.shard.of(places.T).T.flatten()

    def __len__(self) -> int:
        return len(self.positions())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # one seed per (seed, epoch), distinct for any epoch count a run reaches
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        seeds = torch.randint(2**62, (self.size,), generator=generator)
        places = self.positions()
        return zip(order[places].tolist(), seeds[places].tolist())


class ImageBatches:
    """Endless augmented training batches from image files; a last batch smaller than `batch_size` is
    dropped, as for CIFAR. `batch_size` is the global batch, of which a `shard` is served. The state is
    the epoch, the images served in it and the colour generator."""

    def __init__(
        self,
        images: FolderImages | FolderFiles,
        batch_size: int,
        seed: int,
        workers: int,
        lighting_std: float,
        mean: torch.Tensor,
        device: torch.device,
        shard: Shard = WHOLE,
        on_device: Callable[[tuple], torch.Tensor] | None = None,
    ) -> None:
        self.order, self.batch_size, self.shard = EpochOrder(len(images), seed, batch_size, shard), batch_size, shard
        self.loader = DataLoader(
            images,
            batch_size=batch_size // shard.count,
            sampler=self.order,
            drop_last=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,  # no new worker processes every epoch
            collate_fn=files_batch if isinstance(images, FolderFiles) else None,
        )
        # a batch's uint8 images on the device: moved there (decoded by the workers), or decoded there
        self.on_device = on_device or partial(moved, device=device)
        self.lighting_std, self.mean, self.device = lighting_std, mean, device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # the colour noise, drawn on the device
        self.batches: Iterator | None = None  # the loader's iterator over the rest of this epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batches is None:
            self.batches = iter(self.loader)
        try:
            batch = next_batch(self.batches)
        except StopIteration:  # the epoch is over: a fresh permutation
            self.order.epoch, self.order.start = self.order.epoch + 1, 0
            self.batches = iter(self.loader)
            batch = next_batch(self.batches)
        self.order.start += self.batch_size  # the global batch: every shard served its part
        x = normalize(self.on_device(batch), self.mean)
        if self.lighting_std:
            x = lighting(x, self.lighting_std, self.generator, self.shard)
        return x, batch[1].to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"epoch": self.order.epoch, "position": self.order.start, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order.epoch, self.order.start = state["epoch"], state["position"]
        self.generator.set_state(state["generator"])
        self.batches = None  # the next batch starts from the restored position


class FolderEval:
    """A held-out set in fixed views, normalized on the device: batches of (B, 3, H, W), or of
    (B, 10, 3, H, W) for ten crops; with a `shard`, every `count`-th image from the `rank`-th, whose
    counts resexp.evaluate sums over the processes."""

    def __init__(
        self,
        images: FolderImages | FolderFiles,
        batch_size: int,
        workers: int,
        mean: torch.Tensor,
        device: torch.device,
        shard: Shard = WHOLE,
        on_device: Callable[[tuple], torch.Tensor] | None = None,
    ) -> None:
        part = images if shard.count == 1 else Subset(images, range(shard.rank, len(images), shard.count))
        collate = files_batch if isinstance(images, FolderFiles) else None
        self.loader = DataLoader(
            part, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda", collate_fn=collate
        )
        self.mean, self.device = mean, device
        self.on_device = on_device or partial(moved, device=device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.loader)
        while True:
            try:
                batch = next_batch(batches)
            except StopIteration:
                return
            yield normalize(self.on_device(batch), self.mean), batch[1].to(self.device, non_blocking=True)


def moved(batch: tuple, device: torch.device) -> torch.Tensor:
    """A batch of images the workers decoded and cut (decode="cpu"), on the device."""
    return batch[0].to(device, non_blocking=True)


def centre_crop(image: torch.Tensor, size: int, crop: int) -> torch.Tensor:
    """The shorter side resized to `size`, then the central `crop` x `crop` window."""
    return F.center_crop(F.resize(image, size), crop)


def ten_crops(image: torch.Tensor, size: int, crop: int) -> torch.Tensor:
    """§3.4's "standard 10-crop testing" (AlexNet's): the four corners and the centre of the image
    resized to `size`, and of its mirror image; (10, 3, crop, crop)."""
    return torch.stack(F.ten_crop(F.resize(image, size), crop))


def next_batch(batches: Iterator) -> tuple[torch.Tensor, torch.Tensor]:
    """The loader's next batch. A worker's ResexpError arrives with its traceback in the message: keep the message."""
    try:
        return next(batches)
    except ResexpError as error:
        raise ResexpError(str(error).strip().splitlines()[-1].split("ResexpError: ", 1)[-1]) from None


def class_folder(path: Path, what: str) -> ImageFolder:
    """The images of `path`/<class>/, or a one-line error saying what is missing."""
    if not path.is_dir():
        raise ResexpError(
            f"ImageNet {what} images not found: {path} is not a folder; point data.root (or RESEXP_IMAGENET) at "
            "a folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (ImageNet cannot be downloaded for you)"
        )
    try:
        return ImageFolder(str(path))
    except OSError as error:  # no class folders, or class folders without images
        raise ResexpError(f"ImageNet {what} images not found in {path}: {error}") from None


def imagenet(
    *,
    root: str,
    num_classes: int,
    scale: list[int],
    crop: int,
    test_size: int,
    lighting_std: float,
    mean: list[float],
    workers: int,
    eval_batch_size: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    shard: Shard = WHOLE,
    decode: str = "cpu",
) -> Data:
    """The ImageNet data of `root`, or a `shard` of it. The values are checked at the config edge (resexp/config.py): what is
    checked here is what only the folders can tell."""
    base = Path(root).expanduser().absolute()  # absolute: the messages say where it looked
    train, val = class_folder(base / "train", "training"), class_folder(base / "val", "validation")
    if unknown := sorted(set(val.classes) - set(train.classes)):
        raise ResexpError(
            f"{base / 'val'} has classes that {base / 'train'} lacks: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    if len(train.classes) != num_classes:  # more: labels past the classifier; fewer: outputs nothing trains
        raise ResexpError(
            f"data.num_classes={num_classes}, but {base / 'train'} has {len(train.classes)} class folders; "
            f"set data.num_classes={len(train.classes)}"
        )
    if batch_size > len(train):
        raise ResexpError(
            f"batch size {batch_size} is larger than the {len(train)} training images in {base / 'train'}"
        )
    # A label is its class's position in train/'s sorted list, ImageNet's standard order when all 1000 are there.
    val.samples = [(path, train.class_to_idx[val.classes[label]]) for path, label in val.samples]
    # decode=auto: on the device where it is a GPU (its JPEG decoder), in the workers elsewhere
    scale_range, on_device = (scale[0], scale[1]), decode == "gpu" or (decode == "auto" and device.type == "cuda")
    # Per channel: over random scales and crops the per-pixel mean is flat, so the two are the same.
    mean_tensor = torch.tensor(mean, device=device)[:, None, None]

    def augment(image: torch.Tensor) -> torch.Tensor:  # in a worker, its image's seed set (FolderImages)
        return apply_crop(image, draw_crop(*image.shape[-2:], scale_range, crop), crop)

    def crops(batch: tuple) -> torch.Tensor:  # decode="gpu": the batch's crops, drawn in the workers
        return device_views(batch, device, lambda image, drawn: apply_crop(image, drawn, crop))

    def held_out(views: Callable[..., torch.Tensor]) -> FolderEval:
        view = partial(views, size=test_size, crop=crop)
        return FolderEval(
            FolderFiles(val, scale_range, crop) if on_device else FolderImages(val, view),
            eval_batch_size,
            workers,
            mean_tensor,
            device,
            shard,
            partial(device_views, device=device, views=view) if on_device else None,
        )

    images = FolderFiles(train, scale_range, crop) if on_device else FolderImages(train, augment)
    return Data(
        train=ImageBatches(
            images, batch_size, seed, workers, lighting_std, mean_tensor, device, shard, crops if on_device else None
        ),
        evals={"val": held_out(centre_crop)},  # centre crops during training: the bold curves of Fig. 4
        final={"test": held_out(ten_crops)},  # ten crops once at the end: the numbers of Tables 2 and 3
        num_train=len(train),
        image_shape=(3, crop, crop),
        top5=True,
    )
