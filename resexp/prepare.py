"""`resexp prepare`: ImageNet's class folders (or Imagenette, which torchvision downloads) packed once into
the arrays that data=imagenet_packed holds in GPU memory (resexp/data/packed.py).

Each image is decoded as data=imagenet decodes it (torchvision's decoder; PIL for what it lacks: CMYK,
greyscale and PNG files named .JPEG become RGB), its shorter side resized to S with antialiasing and its
central S x S square kept: exactly data=imagenet's validation view at test_size = crop = S. Worker
processes, one per CPU core, decode chunks of images and write them in place into `<split>-<S>.u8.partial`;
the chunks done are recorded (after an fsync) in `<split>-<S>.progress`, so a prepare stopped at any
instant resumes where it was. The labels, the images renamed to their final name and, last, the manifest
(atomic) end a split: without a manifest nothing reads the arrays.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import resexp
from resexp.data.packed import FORMAT, image_bytes, paths
from resexp.errors import ResexpError
from resexp.files import atomic_write, atomic_write_text, open_regular, read_bytes, refuse_links

RULE = "shorter side resized to S (torchvision, antialiased), central S x S square (torchvision's center_crop)"
CHUNK = 256  # images a worker decodes and writes at once: one progress record each
IMAGENETTE = ("full", "320px", "160px")  # torchvision's Imagenette sizes


@dataclass(frozen=True)
class Source:
    """One split to pack: its images and labels, in the folder reader's order, and its classes."""

    name: str  # where it came from, as the manifest says
    split: str
    samples: list[tuple[str, int]]  # (path, label)
    classes: list[str]  # the class folders (wnids), in label order


def folder_sources(root: Path) -> list[Source]:
    """train/ and val/ of a class-folder root, labelled as data=imagenet labels them (train/'s sorted classes)."""
    from resexp.data.imagenet_folders import class_folder

    if missing := [str(root / split) for split in ("train", "val") if not (root / split).is_dir()]:
        raise ResexpError(
            f"{' and '.join(missing)} not found: SOURCE must hold train/<class>/* and val/<class>/* (ImageNet's "
            "layout), or be imagenette"
        )
    train, val = class_folder(root / "train", "training"), class_folder(root / "val", "validation")
    if unknown := sorted(set(val.classes) - set(train.classes)):
        raise ResexpError(f"{root / 'val'} has classes that {root / 'train'} lacks: {', '.join(unknown[:5])}")
    val_samples = [(path, train.class_to_idx[val.classes[label]]) for path, label in val.samples]
    return [
        Source(str(root), "train", train.samples, train.classes),
        Source(str(root), "val", val_samples, train.classes),
    ]


def imagenette_sources(root: Path, size: str) -> list[Source]:
    """Imagenette's splits through torchvision, downloaded (md5-checked) into `root` unless they are there."""
    from torchvision.datasets import Imagenette

    if size not in IMAGENETTE:
        raise ResexpError(
            f"--imagenette-size={size!r} is not one of torchvision's; choose one of {', '.join(IMAGENETTE)}"
        )
    sources = []
    for split in ("train", "val"):
        try:  # a loader that returns the path: the samples in torchvision's order, decoded here
            found = Imagenette(str(root), split=split, size=size, download=True, loader=str)
        except Exception as error:  # offline, disk full, bad checksum: the same advice
            raise ResexpError(f"Imagenette ({size}) could not be found or downloaded in {root} ({error})") from None
        sources.append(Source(f"imagenette-{size}", split, [found[i] for i in range(len(found))], list(found.wnids)))
    return sources


def pack_chunk(task: tuple[str, int, list[str], int]) -> tuple[int, list[tuple[int, str]]]:
    """Worker: decode the images of one chunk and write them at their place in the partial file; the
    indices and reasons of those that cannot be read."""
    from resexp.data.decode import read_image
    from resexp.data.imagenet_folders import centre_crop

    target, start, files, size = task
    squares = np.zeros((len(files), 3, size, size), dtype=np.uint8)
    bad = []
    for offset, path in enumerate(files):
        try:
            squares[offset] = centre_crop(read_image(path), size, size).numpy()
        except Exception as error:  # a broken file fails in many ways; all mean: this image cannot be used
            bad.append((start + offset, str(error).splitlines()[0] if str(error) else type(error).__name__))
    fd = open_regular(Path(target), os.O_WRONLY)
    try:
        os.pwrite(fd, squares.tobytes(), image_bytes(start, size))
    finally:
        os.close(fd)
    return start, bad


def quiet_worker() -> None:
    """A worker leaves stop requests to the command, which terminates it; one thread each: the cores are the workers'."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)


def fingerprint(source: Source, size: int) -> str:
    """What a resumed prepare must share with the one it continues."""
    summed = hashlib.sha256(json.dumps([source.name, size, source.samples, source.classes, FORMAT]).encode())
    return summed.hexdigest()


def sha256_of(path: Path) -> str:
    summed = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as file:
        while block := file.read(2**24):
            summed.update(block)
    return summed.hexdigest()


def prepared(source: Source, out: Path, size: int) -> dict[str, Any] | None:
    """The manifest of this very split packed at `size` in `out` already, else None."""
    try:
        manifest = json.loads(read_bytes(paths(out, source.split, size)["manifest"]))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("fingerprint") == fingerprint(source, size) else None


def progress_of(record: Path, mark: str) -> dict[str, Any]:
    """The chunks done by an earlier prepare of the same split, size and images; empty otherwise."""
    try:
        progress = json.loads(read_bytes(record))
    except (OSError, ValueError):
        return {"fingerprint": mark, "done": [], "bad": []}
    if not isinstance(progress, dict) or progress.get("fingerprint") != mark:
        return {"fingerprint": mark, "done": [], "bad": []}
    return progress


def check_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if free < needed:
        raise ResexpError(
            f"{out} has {free / 2**30:.1f} GiB free and the packed files need {needed / 2**30:.1f} GiB more; "
            "free some space, choose another folder, or a smaller --size"
        )


def pack(
    source: Source, out: Path, size: int, workers: int, skip_bad: bool, chunk: int = CHUNK, show: bool = True
) -> dict[str, Any]:
    """Pack one split into `out` (resumed where an earlier prepare of it stopped); its manifest."""
    files = paths(out, source.split, size)
    partial, record = files["images"].with_suffix(".u8.partial"), files["images"].with_suffix(".progress")
    refuse_links([*files.values(), partial, record])
    total = image_bytes(len(source.samples), size)
    mark = fingerprint(source, size)
    if (manifest := prepared(source, out, size)) is not None:
        return manifest
    files["manifest"].unlink(missing_ok=True)  # another source's or size's: from now on nothing reads as whole
    # a record's chunks are starts of `chunk` images: another chunk size starts over
    progress = progress_of(record, f"{mark}/{chunk}")
    if progress["done"] and files["images"].exists() and not partial.exists():
        os.replace(files["images"], partial)  # stopped while finishing: every chunk is there
    if not progress["done"] or not partial.exists():
        progress = {"fingerprint": f"{mark}/{chunk}", "done": [], "bad": []}
        partial.unlink(missing_ok=True)
    allocated = partial.stat().st_blocks * 512 if partial.exists() else 0
    check_space(out, total + 8 * len(source.samples) - allocated)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        os.ftruncate(fd, total)
        done = set(progress["done"])
        tasks = [
            (str(partial), start, [path for path, _ in source.samples[start : start + chunk]], size)
            for start in range(0, len(source.samples), chunk)
            if start not in done
        ]
        what = f"{source.split} ({len(source.samples):,} images)"
        for start, bad in run_tasks(tasks, workers, what, len(source.samples), show):
            if bad and not skip_bad:
                index, reason = bad[0]
                os.fsync(fd)
                atomic_write_text(record, json.dumps(progress))
                raise ResexpError(
                    f"{source.samples[index][0]} is not a readable image ({reason}); remove or replace it and run the "
                    "same command (it resumes), or add --skip-bad to leave such images out"
                )
            os.fsync(fd)  # the chunk is on disk before the record says so
            progress["done"].append(start)
            progress["bad"] += [[index, source.samples[index][0], reason] for index, reason in bad]
            atomic_write_text(record, json.dumps(progress))
        os.fsync(fd)
    finally:
        os.close(fd)
    skipped = {index for index, _, _ in progress["bad"]}
    labels = np.array([-1 if i in skipped else label for i, (_, label) in enumerate(source.samples)], dtype="<i8")
    atomic_write(files["labels"], lambda file: file.write(labels.tobytes()))
    images_sum = sha256_of(partial)
    os.replace(partial, files["images"])
    counts = np.bincount(labels[labels >= 0], minlength=len(source.classes))
    manifest = {
        "format": FORMAT,
        "split": source.split,
        "size": size,
        "rule": RULE,
        "source": source.name,
        "resexp": resexp.__version__,
        "slots": len(source.samples),
        "images": int(counts.sum()),
        "classes": source.classes,
        "per_class": dict(zip(source.classes, counts.tolist())),
        "skipped": [path for _, path, _ in progress["bad"]],
        "images_sha256": images_sum,
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
        "fingerprint": mark,
    }
    atomic_write_text(files["manifest"], json.dumps(manifest, indent=1))  # last: now the split reads as whole
    record.unlink(missing_ok=True)
    return manifest


def run_tasks(tasks: list, workers: int, what: str, total: int, show: bool) -> Iterator[tuple[int, list]]:
    """The tasks' results as they finish, over `workers` processes (0: in this one), with a progress bar,
    the rate and the time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    sizes = {start: len(files) for _, start, files, _ in tasks}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not show) as bar:
        task = bar.add_task(what, total=total, completed=total - sum(sizes.values()), rate="")
        began, count = time.perf_counter(), 0
        if workers == 0:
            results = map(pack_chunk, tasks)
            pool = None
        else:
            # forkserver, not fork: a fork copies this process's threads' locks (rich's refresh thread, torch's
            # OpenMP pool, a test runner's I/O threads) held, and a worker could wait on one for ever (seen)
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])  # imported once by the server, not by each worker
            pool = context.Pool(workers, initializer=quiet_worker)
            results = pool.imap_unordered(pack_chunk, tasks)
        try:
            for start, bad in results:
                count += sizes[start]
                rate = f"{count / (time.perf_counter() - began):,.0f} images/s"
                bar.update(task, advance=sizes[start], rate=rate)
                yield start, bad
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()


def sources(source: str, out: Path, imagenette_size: str = "160px") -> list[Source]:
    """The splits of `source`: a class-folder root, or `imagenette` (downloaded into `out`/download/)."""
    if source == "imagenette":
        return imagenette_sources(out / "download", imagenette_size)
    return folder_sources(Path(source).expanduser().absolute())


def prepare(
    source: str, out: Path, size: int, workers: int, skip_bad: bool, imagenette_size: str = "160px", show: bool = True
) -> list[dict[str, Any]]:
    """Pack both splits of `source` into `out`; their manifests."""
    check_size(size)
    out = Path(out).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    return [pack(split, out, size, workers, skip_bad, show=show) for split in sources(source, out, imagenette_size)]


def check_size(size: int) -> None:
    if size < 8:
        raise ResexpError(f"--size={size} is too small to train on; the presets use 128 (or 64 with model.stem=small)")
