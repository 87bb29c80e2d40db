"""Images per second of resexp's ImageNet input pipelines: JPEGs decoded by DataLoader workers
(resexp/data/imagenet_folders.py: the augmented training stream, the centre crops and the ten crops, with the
settings of conf/data/imagenet.yaml), and packed squares augmented on the device (resexp/data/packed.py). A
run is bound by these rates when the GPU is faster; they tell how many `data.workers` a JPEG run needs.

    python scripts/imagenet_loader.py ROOT [--workers 0 4 16] [--batches 20] [--decode cpu gpu] [--device cuda]
    python scripts/imagenet_loader.py ROOT --packed DIR --size 128 [--device cuda] [--threads 1 2]

ROOT holds train/<wnid>/ and val/<wnid>/ (the 104-image sample works: link both to its val/); DIR is what
`resexp prepare ROOT DIR --size S` wrote. On the CPU the packed rate is per thread count (one core each).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from resexp.config import DATA_BUILDERS, builder, compose

CPU = torch.device("cpu")


def rate(batches, limit: int, work=lambda x: x, device: torch.device = CPU) -> float:
    """Images/s over up to `limit` batches, each through `work`, after one untimed batch (start-up)."""
    batches = iter(batches)
    work(next(batches)[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started, images = time.perf_counter(), 0
    for x, labels in itertools.islice(batches, limit):
        work(x)
        images += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - started)


def data(name: str, overrides: list[str], args: argparse.Namespace, device: torch.device):
    overrides = [f"data.num_classes={args.classes}", f"data.eval_batch_size={args.batch_size}", *overrides]
    build = builder(compose(f"data={name}", *overrides), "data", DATA_BUILDERS)
    return build(batch_size=args.batch_size, seed=0, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder holding train/ and val/ class folders")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to time")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--classes", type=int, default=1000, help="the folders' classes (the sample: 104)")
    parser.add_argument("--packed", metavar="DIR", help="also time the packed squares that resexp prepare wrote here")
    parser.add_argument("--size", type=int, default=128, help="S of the packed files (128: training at 112x112)")
    parser.add_argument("--device", default="cpu", help="the training device: cpu or cuda (decode=gpu, packed)")
    parser.add_argument(
        "--decode", nargs="+", default=["cpu", "gpu"], help="JPEG paths to time: cpu (workers) and gpu (the device)"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="CPU threads for the packed path on cpu")
    args = parser.parse_args()
    print(f"JPEGs, batch {args.batch_size}:")
    device = torch.device(args.device)
    head = f"{'decode':>6} {'workers':>8} {'train img/s':>12} {'per core':>9} {'read img/s':>11} {'centre img/s':>13}"
    print(f"{head} {'ten-crop img/s':>15}")
    for decode, workers in itertools.product(args.decode, args.workers):
        where = device if decode == "gpu" else CPU  # decode=cpu: the workers' pipeline alone
        jpegs = data(
            "imagenet", [f"data.root={args.root}", f"data.workers={workers}", f"data.decode={decode}"], args, where
        )
        train = rate(jpegs.train, args.batches, device=where)
        # the workers alone: their batches before the device (decode=gpu: bytes read and crops drawn)
        read = rate(((batch[0], batch[1]) for batch in jpegs.train.loader), args.batches)
        centre = rate(jpegs.evals["val"], args.batches, device=where)
        ten = rate(jpegs.final["test"], args.batches, device=where)
        per_core = train / max(1, workers)
        print(f"{decode:>6} {workers:>8} {train:>12.0f} {per_core:>9.0f} {read:>11.0f} {centre:>13.0f} {ten:>15.0f}")
    if not args.packed:
        return
    print(
        f"packed at {args.size}x{args.size} on {device}, batch {args.batch_size} (gather, draws, windows, colour, mean):"
    )
    for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        packed = data("imagenet_packed", [f"data.root={args.packed}", f"data.size={args.size}"], args, device)
        train = rate(packed.train, args.batches, packed.transform, device)
        centre = rate(packed.evals["val"], args.batches, device=device)
        ten = rate(packed.final["test"], args.batches, device=device)
        print(f"{threads:>3} threads: train {train:,.0f} img/s, centre {centre:,.0f} img/s, ten-crop {ten:,.0f} img/s")


if __name__ == "__main__":
    main()
