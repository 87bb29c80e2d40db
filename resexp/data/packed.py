"""ImageNet (or any class-folder set) packed once by `resexp prepare` (resexp/prepare.py) and held in GPU
memory: no JPEG is decoded during training, and each batch is gathered and augmented on the device.

A packed split is three files in one folder: `<split>-<S>.u8`, the uint8 images (N, 3, S, S), each the
central S x S square of the image with its shorter side resized to S; `<split>-<S>.labels`, int64
labels (-1: an image prepare skipped); and `<split>-<S>.json`, the manifest, written last, which names the
classes and holds the arrays' SHA-256. Reading checks both sums: the files are arrays and JSON, never
code, and a damaged or foreign one is a one-line error.

Training (§3.4 at a reduced size, resexp/data/crops.py): the paper's scale augmentation as a window of
the square whose side is 224/L of it, L uniform in [256, 480], resampled to R = S x 224/256, mirrored
with probability 1/2, AlexNet's colour noise and the mean. The draws are made outside the step from the
run's generator into one fixed device tensor, and the window sampling runs inside the step, so that a
CUDA graph captures it with the net. Validation: the central R x R window (the paper's 224 of 256);
the final test, ten R x R windows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resexp.data.crops import ALPHA, DRAWN, centre_window, colour_shift, draw_windows, sample_windows, ten_windows
from resexp.data.loaders import WHOLE, Data, Epochs, Shard
from resexp.errors import ResexpError, first_line
from resexp.files import open_regular, read_bytes, why_not

log = logging.getLogger("resexp")
FORMAT = "resexp-packed/1"  # the manifest's "format": what this reader reads
CHUNK = 64 * 2**20  # bytes read (and summed) at a time
GPU_HEADROOM = 8 * 2**30  # bytes of GPU memory left free for the net, its activations and cuDNN's workspaces


def paths(root: Path, split: str, size: int) -> dict[str, Path]:
    """The files of a packed split: images, labels, manifest."""
    stem = Path(root) / f"{split}-{size}"
    return {
        "images": stem.with_suffix(".u8"),
        "labels": stem.with_suffix(".labels"),
        "manifest": stem.with_suffix(".json"),
    }


def image_bytes(count: int, size: int) -> int:
    return count * 3 * size * size


def read_manifest(root: Path, split: str, size: int) -> dict[str, Any]:
    """The checked manifest of a packed split, or one line: missing (not prepared, or prepare was
    stopped), or not a manifest this reader wrote."""
    path = paths(root, split, size)["manifest"]
    try:
        manifest = json.loads(read_bytes(path, 2**26))
    except OSError as error:
        hint = f"resexp prepare SOURCE {root} --size {size}" if error.errno == 2 else "replace it"
        raise ResexpError(f"{path} cannot be read ({why_not(error)}); {hint}") from None
    except ValueError as error:
        raise ResexpError(f"{path} is not a manifest of resexp prepare ({error}); prepare again") from None
    shapes = {
        "format": str, "split": str, "size": int, "slots": int, "classes": list, "images_sha256": str,
        "labels_sha256": str, "skipped": list, "per_class": dict,
    }  # fmt: skip
    wrong = [
        key for key, kind in shapes.items() if not isinstance(manifest, dict) or not isinstance(manifest.get(key), kind)
    ]
    if wrong or manifest["format"] != FORMAT:
        what = f"format {manifest.get('format')!r}" if not wrong else f"its {', '.join(wrong)}"
        raise ResexpError(
            f"{path} is not a manifest of resexp prepare ({what}; this reader reads {FORMAT}); prepare again"
        )
    if (manifest["split"], manifest["size"]) != (split, size) or not all(
        isinstance(c, str) for c in manifest["classes"]
    ):
        raise ResexpError(
            f"{path} describes another split or size ({manifest['split']}, {manifest['size']}); prepare again"
        )
    return manifest


def read_checked(path: Path, expected: int, digest: str, into: torch.Tensor) -> None:
    """The regular file `path`, which must hold `expected` bytes whose SHA-256 is `digest`, read into the
    flat uint8 tensor `into` (on the CPU or a GPU) a chunk at a time; one line otherwise."""
    summed = hashlib.sha256()
    staging = (
        None if into.device.type == "cpu" else torch.empty(min(CHUNK, expected), dtype=torch.uint8, pin_memory=True)
    )
    try:
        with os.fdopen(open_regular(path), "rb", buffering=0) as file:
            if (found := os.fstat(file.fileno()).st_size) != expected:
                raise ResexpError(
                    f"{path} holds {found:,} bytes where its manifest says {expected:,}: it is damaged or was not written whole; prepare again"
                )
            for start in range(0, expected, CHUNK):
                end = min(start + CHUNK, expected)
                target = into[start:end] if staging is None else staging[: end - start]
                view = memoryview(target.numpy())
                read = 0
                while read < len(view):
                    if not (got := file.readinto(view[read:])):
                        raise ResexpError(f"{path} ended early: it is damaged; prepare again")
                    read += got
                summed.update(view)
                if staging is not None:
                    into[start:end].copy_(target)
    except OSError as error:
        raise ResexpError(f"{path} cannot be read ({why_not(error)}); prepare again") from None
    if summed.hexdigest() != digest:
        raise ResexpError(
            f"{path} does not match its manifest's SHA-256: it is damaged or not this manifest's; prepare again"
        )


@dataclass
class Split:
    images: torch.Tensor  # uint8 (slots, 3, S, S), in GPU or (pinned) host memory
    labels: torch.Tensor  # int64 (slots,), on the training device; -1 where prepare skipped an image
    kept: torch.Tensor  # the indices of the images that are there, on the training device
    classes: list[str]  # the class folders' names (wnids), in label order


# Splits read in this process, by their checksums and where they are: the runs of a sweep trained at once
# (the shared-GPU launcher) share one read-only copy, freed with the last run that holds it.
LOADED: weakref.WeakValueDictionary[tuple, Split] = weakref.WeakValueDictionary()


def load(
    root: Path, split: str, size: int, holder: torch.device, device: torch.device, manifest: dict[str, Any]
) -> Split:
    """A packed split, its images read into `holder`'s memory (pinned when the training `device` is a GPU
    and the images are not on it), both sums checked."""
    files, slots = paths(root, split, size), manifest["slots"]
    pinned = holder.type == "cpu" and device.type == "cuda"
    try:
        flat = torch.empty(image_bytes(slots, size), dtype=torch.uint8, device=holder, pin_memory=pinned)
    except RuntimeError as error:  # torch.OutOfMemoryError is one; a failed pinned allocation another
        where = "pinned host memory" if pinned else str(holder)
        raise ResexpError(
            f"{files['images']} ({image_bytes(slots, size) / 2**30:.1f} GiB) does not fit in {where} "
            f"({first_line(error)}); prepare a smaller size (resexp prepare --size)"
        ) from None
    read_checked(files["images"], len(flat), manifest["images_sha256"], flat)
    labels = torch.empty(slots * 8, dtype=torch.uint8)
    read_checked(files["labels"], len(labels), manifest["labels_sha256"], labels)
    labels = torch.from_numpy(labels.numpy().view("<i8").astype(np.int64))
    if len(labels) and (labels.min() < -1 or labels.max() >= len(manifest["classes"])):
        raise ResexpError(f"{files['labels']} has labels outside -1..{len(manifest['classes']) - 1}; prepare again")
    kept = torch.nonzero(labels >= 0).flatten()
    return Split(flat.view(slots, 3, size, size), labels.to(device), kept.to(device), manifest["classes"])


def choose_holder(needed: int, device: torch.device, placement: str) -> torch.device:
    """Where the packed images live: on the GPU when they fit beside the net (placement auto or device),
    else in pinned host memory, said in one line."""
    if device.type != "cuda" or placement == "host":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    if needed + GPU_HEADROOM <= free:
        return device
    what = (
        f"the packed images ({needed / 2**30:.1f} GiB) and {GPU_HEADROOM / 2**30:.0f} GiB for the net do not fit in "
        f"{device}'s {free / 2**30:.1f} GiB free"
    )
    if placement == "device":
        raise ResexpError(
            f"{what}; prepare a smaller size (resexp prepare --size), free the GPU, or set data.placement=auto"
        )
    log.warning(
        "%s: they are held in pinned host memory and each batch copied over, slower; a smaller --size fits", what
    )
    return torch.device("cpu")


class PackedBatches(Epochs):
    """Endless training batches of packed images, as for CIFAR (Epochs): the global batch's draws all
    made and the `shard`'s slice served. A batch is served as the uint8 squares (B, 3, S, S) on the
    device; `transform` (run in the step) makes them the net's input from the draws that the batch left
    in `drawn`."""

    def __init__(
        self, split: Split, batch_size: int, seed: int, window: Callable, device: torch.device, shard: Shard = WHOLE
    ) -> None:
        super().__init__(len(split.kept), batch_size, seed, device, shard)
        self.split, self.window, self.device = split, window, device
        self.drawn = torch.zeros(batch_size // shard.count, DRAWN, device=device)  # fixed: a captured step reads it
        self.on_host = split.images.device.type == "cpu" and device.type == "cuda"
        if self.on_host:  # two pinned buffers: one fills while the other's copy to the GPU may still run
            shape = (batch_size // shard.count, *split.images.shape[1:])
            self.buffers = [torch.empty(shape, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            self.copied = [torch.cuda.Event(), torch.cuda.Event()]
            self.turn, self.kept_host, self.host_epoch = 0, split.kept.cpu(), None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.split.kept[self.next_places()]
        self.drawn.copy_(self.window(self.batch_size, self.generator, self.shard))
        return self.gather(index), self.split.labels[index]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The squares of `index`, on the device: gathered there, or from pinned host memory and copied."""
        if not self.on_host:
            return self.split.images[index]
        if self.host_epoch != self.epoch:  # the epoch's permutation on the host: one sync an epoch
            self.order_host, self.host_epoch = self.order.cpu(), self.epoch
        host = self.kept_host[self.shard.of(self.order_host[self.position - self.batch_size : self.position])]
        self.copied[self.turn].synchronize()  # this buffer's last copy has left it
        buffer = torch.index_select(self.split.images, 0, host, out=self.buffers[self.turn])
        images = buffer.to(self.device, non_blocking=True)
        self.copied[self.turn].record()
        self.turn = 1 - self.turn
        return images

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.host_epoch = None


class PackedEval:
    """A packed held-out split in fixed views (`views`: squares to (B, 3, R, R) or (B, 10, 3, R, R)), as
    floats with the mean subtracted; with a `shard`, every `count`-th batch from the `rank`-th."""

    def __init__(
        self,
        split: Split,
        views: Callable,
        mean: torch.Tensor,
        batch_size: int,
        device: torch.device,
        shard: Shard = WHOLE,
    ) -> None:
        self.split, self.views, self.mean, self.batch_size, self.device, self.shard = (
            split,
            views,
            mean,
            batch_size,
            device,
            shard,
        )

    def __iter__(self):
        kept = self.split.kept.to(self.split.images.device)
        for start in range(self.shard.rank * self.batch_size, len(kept), self.batch_size * self.shard.count):
            index = kept[start : start + self.batch_size]
            images = self.views(self.split.images[index].to(self.device, non_blocking=True))
            yield (
                images.to(torch.get_default_dtype()).div_(255).sub_(self.mean),
                self.split.labels[index.to(self.device)],
            )


def imagenet_packed(
    *,
    root: str,
    size: int,
    num_classes: int,
    scale: list[int],
    crop: int,
    test_size: int,
    lighting_std: float,
    mean: list[float],
    placement: str,
    eval_batch_size: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    shard: Shard = WHOLE,
) -> Data:
    """The packed splits of `root` at `size` (resexp prepare), trained at R = size x crop / test_size."""
    base = Path(root).expanduser().absolute()
    resolution = round(size * crop / test_size)
    manifests = {split: read_manifest(base, split, size) for split in ("train", "val")}
    classes = manifests["train"]["classes"]
    if manifests["val"]["classes"] != classes:
        raise ResexpError(f"{base}: the val split's classes are not the train split's; prepare both from one source")
    if len(classes) != num_classes:
        raise ResexpError(
            f"data.num_classes={num_classes}, but {base} was prepared with {len(classes)} classes; set data.num_classes={len(classes)}"
        )
    key = tuple(m[sum] for m in manifests.values() for sum in ("images_sha256", "labels_sha256"))
    key += (str(device), placement)
    train, val = LOADED.get((*key, "train")), LOADED.get((*key, "val"))
    if train is None or val is None:
        needed = sum(image_bytes(m["slots"], size) for m in manifests.values())
        holder = choose_holder(needed, device, placement)
        train, val = (load(base, split, size, holder, device, manifests[split]) for split in ("train", "val"))
        LOADED[(*key, "train")], LOADED[(*key, "val")] = train, val
    if batch_size > len(train.kept):
        raise ResexpError(f"batch size {batch_size} is larger than the {len(train.kept)} training images in {base}")
    # Per channel: over random scales and crops the per-pixel mean is flat, so the two are the same.
    mean_tensor = torch.tensor(mean, device=device)[:, None, None]
    batches = PackedBatches(
        train,
        batch_size,
        seed,
        lambda count, generator, part: draw_windows(count, tuple(scale), crop, lighting_std, generator, part),
        device,
        shard,
    )

    def transform(squares: torch.Tensor) -> torch.Tensor:
        """The served squares to the net's input, from the draws the batch left (runs inside the step)."""
        drawn = batches.drawn.to(torch.get_default_dtype())
        x = sample_windows(squares, drawn, resolution).div_(255)
        x = x + colour_shift(drawn[:, ALPHA]) - mean_tensor
        return x.contiguous(memory_format=torch.channels_last)

    def held_out(views: Callable) -> PackedEval:
        return PackedEval(val, views, mean_tensor, eval_batch_size, device, shard)

    return Data(
        train=batches,
        evals={"val": held_out(lambda squares: centre_window(squares, resolution))},  # the bold curves of Fig. 4
        final={"test": held_out(lambda squares: ten_windows(squares, resolution))},  # Tables 2 and 3's ten crops
        num_train=len(train.kept),
        image_shape=(3, size, size),
        top5=True,
        transform=transform,
        batch_dtype=torch.uint8,
    )
