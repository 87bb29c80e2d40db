"""Milliseconds per training step of resexp's nets at the paper's batch size, on this machine.

    python scripts/benchmark.py                       # ResNet-20/56/110 and plain-56, auto device
    python scripts/benchmark.py --nets resnet20 --steps 50 --json bench.json

One step is what `resexp train` does per iteration: an augmented CIFAR-shaped batch from the stream
on the device, forward, backward, SGD update. Measured 2026-11-23 on the 2-core CPU CI machine
(torch 2.14.1, fp32, channels_last, 10 steps after 3 warm-up): ResNet-20 305 ms/step (3.3 it/s,
420 images/s), ResNet-56 801 ms, ResNet-110 1667 ms, plain-56 799 ms. GPU: not measured yet.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch
from rich.console import Console
from rich.table import Table

from resexp.data import synthetic
from resexp.models import build_model
from resexp.train import to_device


def step_ms(net: str, steps: int, warmup: int, batch_size: int, device: torch.device) -> float:
    residual, depth = net.startswith("resnet"), int(net.removeprefix("resnet").removeprefix("plain"))
    model = build_model(depth, residual, "basic", "cifar", "identity", 10).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    stream = synthetic(
        num_classes=10, train_size=batch_size * 4, test_size=1, val_size=0, eval_batch_size=1, batch_size=batch_size, seed=0, device=device
    ).train
    for index in range(warmup + steps):
        if index == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        x, y = to_device(*next(stream), device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["resnet20", "resnet56", "resnet110", "plain56"], help="CIFAR nets: resnetN or plainN")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per net")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (the paper: 128)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    rows = []
    for net in args.nets:
        ms = step_ms(net, args.steps, args.warmup, args.batch_size, device)
        rows.append({"net": net, "ms_per_step": ms, "it_per_s": 1000 / ms, "images_per_s": 1000 * args.batch_size / ms})
    table = Table(title=f"training step, batch {args.batch_size}, {device}")
    for column in ("net", "ms/step", "it/s", "images/s"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["net"], f"{row['ms_per_step']:.1f}", f"{row['it_per_s']:.2f}", f"{row['images_per_s']:.0f}")
    Console().print(table)
    if args.json:
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
            "batch_size": args.batch_size,
            "rows": rows,
        }
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
