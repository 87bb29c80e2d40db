"""Images per second of resexp's ImageNet input pipeline (resexp/data/imagenet_folders.py): the augmented
training stream, the centre crops and the ten crops, with the settings of conf/data/imagenet.yaml. An ImageNet run is bound by
this rate when the GPU is faster; it tells how many `data.workers` a run needs.

    python scripts/imagenet_loader.py ROOT [--workers 0 4 16] [--batches 20]

ROOT holds train/<wnid>/ and val/<wnid>/ (the 104-image sample works: link both to its val/).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from hydra.utils import instantiate

from resexp.config import compose


def rate(batches, limit: int) -> float:
    """Images/s over up to `limit` batches, after one untimed batch (worker start-up)."""
    batches = iter(batches)
    next(batches)
    started, images = time.perf_counter(), 0
    for _, labels in itertools.islice(batches, limit):
        images += len(labels)
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder holding train/ and val/ class folders")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to time")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    args = parser.parse_args()
    print(f"{'workers':>8} {'train img/s':>12} {'centre img/s':>13} {'ten-crop img/s':>15}")
    settings = compose("data=imagenet").data  # the config a run uses
    for workers in args.workers:
        build = instantiate(settings, root=args.root, workers=workers, eval_batch_size=args.batch_size)
        data = build(batch_size=args.batch_size, seed=0, device=torch.device("cpu"))
        train = rate(data.train, args.batches)
        centre, ten = rate(data.evals["val"], args.batches), rate(data.final["test"], args.batches)
        print(f"{workers:>8} {train:>12.0f} {centre:>13.0f} {ten:>15.0f}")


if __name__ == "__main__":
    main()
