"""Milliseconds per training step at the paper's batch size: the common PyTorch recipe against resexp's.

    python scripts/benchmark.py                                  # ResNet-20/56/110 and plain-56
    python scripts/benchmark.py --nets resnet56 --compile --json bench.json
    python scripts/benchmark.py --no-common --group 5                # five seeds as one network
    python scripts/benchmark.py --imagenet PACKED JPEGS --nets resnet18 --batch-size 256  # packed vs JPEG-fed
    python scripts/benchmark.py --no-common --twins --nets plain20 plain32 plain44 plain56 \
        resnet20 resnet32 resnet44 resnet56 resnet110                # Fig. 6's sweep, twins grouped

Per net, in one process: (a) the common recipe, a DataLoader with worker processes doing PIL
RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize, fp32, eager, NCHW; and
(b) resexp's step as `resexp train` runs it: images resident on the device, augmented there, bf16
autocast on CUDA, channels_last, the whole step one CUDA graph (`--compile` adds a column with
torch.compile inside the graph; `--group K` one with K runs of the net as one grouped network, per run;
`--twins` one with the net and its plain/residual twin as one grouped network, per run).
Then (c) all the nets at once, each in a thread on its own CUDA stream, as the shared-GPU sweep launcher
trains them: wall time per step of all of them against the sum of (b); with `--twins` also with the
nets of each depth grouped, as `hydra.launcher.group_runs=true` trains them.
Random CIFAR-shaped images: speed does not depend on the pixels. Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import platform
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
from hydra.utils import instantiate
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from resexp.config import compose, pick_precision
from resexp.data import synthetic
from resexp.group import Lockstep, make_group_step
from resexp.models import build_model
from resexp.probes import response_layers, step_gradient_norms
from resexp.step import make_step, new_stream, on_stream, to_device

MEAN, STD = (0.491, 0.482, 0.447), (0.247, 0.243, 0.262)  # CIFAR-10's channel statistics


def depth_of(net: str) -> int:
    return int(net.removeprefix("resnet").removeprefix("plain"))


def twin_of(net: str) -> str:
    return f"{'plain' if net.startswith('resnet') else 'resnet'}{depth_of(net)}"


def make_net(net: str, device: torch.device, channels_last: bool) -> torch.nn.Module:
    model = build_model(depth_of(net), net.startswith("resnet"), "basic", "cifar", "identity", 10).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def sgd(model: torch.nn.Module) -> torch.optim.SGD:
    """The optimizer a run builds: conf/optim/sgd.yaml (the paper's lr 0.1, momentum 0.9, weight decay 1e-4)."""
    return instantiate(compose().optim)(model.parameters())


class PILImages(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: a PIL image from uint8 HWC, then the transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def timed(run_steps: Callable[[int], None], steps: int, warmup: int, device: torch.device) -> float:
    """ms per step of `run_steps(n)` over `steps` steps, after `warmup` untimed ones."""
    run_steps(warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run_steps(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1000 * (time.perf_counter() - started) / steps


def common_ms(net: str, args: argparse.Namespace, device: torch.device) -> float:
    model, generator = make_net(net, device, channels_last=False), np.random.default_rng(0)
    optimizer = sgd(model)
    images = generator.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8)
    augment = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    loader = DataLoader(
        PILImages(images, generator.integers(0, 10, 50_000), augment),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    batches = iter(loader)

    def run_steps(n: int) -> None:
        for _ in range(n):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return timed(run_steps, args.steps, args.warmup, device)


def steps_of(
    step: Callable, seed: int, args: argparse.Namespace, device: torch.device, model: torch.nn.Module | None = None
) -> Callable[[int], None]:
    """resexp's training loop minus logging: batch from a device-resident stream, step, running totals;
    with `model`, its 3x3 layers' gradient norms read to the host every args.grad_norms_every steps, as
    the loop reads them for TensorBoard (grad_norms_every)."""
    layers = response_layers(model) if model is not None else []
    done = 0
    stream = synthetic(
        num_classes=10,
        train_size=args.batch_size * 8,
        test_size=1,
        val_size=0,
        eval_batch_size=1,
        batch_size=args.batch_size,
        seed=seed,
        device=device,
    ).train
    totals = torch.zeros(3, device=device)

    def run_steps(n: int) -> None:
        nonlocal totals, done
        for _ in range(n):
            totals += step(*to_device(*next(stream), device))
            done += 1
            if layers and done % args.grad_norms_every == 0:
                step_gradient_norms(layers).tolist()

    return run_steps


def fast_steps(
    net: str, args: argparse.Namespace, device: torch.device, compile_model: bool, gradients: bool = False
) -> Callable[[int], None]:
    model = make_net(net, device, channels_last=True)
    shape = (args.batch_size, 3, 32, 32)
    step = make_step(
        model, sgd(model), shape, precision=pick_precision("auto", device), cuda_graph=True, compile_model=compile_model
    )
    return steps_of(step, 0, args, device, model if gradients else None)


def in_threads(runs: list[Callable[[int], None]], streams: list[torch.cuda.Stream | None]) -> Callable[[int], None]:
    """`n` steps of every run at once, each in a thread on its stream, as the sweep launcher trains them."""

    def all_steps(n: int) -> None:
        def work(run_steps: Callable[[int], None], stream: torch.cuda.Stream | None) -> None:
            with on_stream(stream):
                run_steps(n)
                if stream is not None:
                    stream.synchronize()

        threads = [threading.Thread(target=work, args=pair) for pair in zip(runs, streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return all_steps


def grouped_steps(nets: list[str], args: argparse.Namespace, device: torch.device) -> Callable[[int], None]:
    """Runs of `nets` (nets of the same layers: one net's seeds, or plain/residual twins) trained as one
    grouped network (hydra.launcher.group_runs=true): each run in its thread with its own data, one group
    step for all (resexp/group.py)."""
    models = [make_net(net, device, channels_last=True) for net in nets]
    optimizers = [sgd(model) for model in models]
    shape = (args.batch_size, 3, 32, 32)
    lockstep = Lockstep(
        make_group_step(models, optimizers, shape, precision=pick_precision("auto", device), cuda_graph=True),
        optimizers,
        [],
    )
    runs = [steps_of(functools.partial(lockstep.step, k), k, args, device) for k in range(len(nets))]
    return in_threads(runs, [new_stream(device)] * len(nets))


def together_ms(nets: list[str], args: argparse.Namespace, device: torch.device, twins: bool) -> float:
    """ms per step of all nets training at once, each in a thread on its own CUDA stream; with `twins`,
    the nets of one depth as one grouped network on one stream."""
    groups: dict[str, list[str]] = {}
    for net in nets:
        groups.setdefault(str(depth_of(net)) if twins else net, []).append(net)
    runs = [
        fast_steps(group[0], args, device, compile_model=False)
        if len(group) == 1
        else grouped_steps(group, args, device)
        for group in groups.values()
    ]
    return timed(in_threads(runs, [new_stream(device) for _ in runs]), args.steps, args.warmup, device)


def imagenet_ms(net: str, data: str, overrides: list[str], args: argparse.Namespace, device: torch.device) -> float:
    """ms per training step of an ImageNet net (plain18 ... resnet34) fed by `data`: imagenet (JPEGs decoded
    by DataLoader workers) or imagenet_packed (squares held on the device, windows sampled inside the step),
    with the config's `overrides`; the step as `resexp train` builds it (a CUDA graph on CUDA)."""
    from resexp.config import DATA_BUILDERS, builder

    build = builder(compose(f"data={data}", f"data.num_classes={args.classes}", *overrides), "data", DATA_BUILDERS)
    stream = build(batch_size=args.batch_size, seed=0, device=device)
    residual, depth = net.startswith("resnet"), int(net.removeprefix("resnet").removeprefix("plain"))
    model = build_model(depth, residual, "basic", "imagenet", "identity", args.classes)
    model = model.to(device, memory_format=torch.channels_last)
    extra = {"prepare": stream.transform, "batch_dtype": stream.batch_dtype} if stream.transform else {}
    shape = (args.batch_size, *stream.image_shape)
    step = make_step(model, sgd(model), shape, precision=pick_precision("auto", device), cuda_graph=True, **extra)
    batches = stream.train

    def run_steps(n: int) -> None:
        for _ in range(n):
            step(*to_device(*next(batches), device))

    return timed(run_steps, args.steps, args.warmup, device)


def imagenet_table(args: argparse.Namespace, device: torch.device) -> None:
    """--imagenet PACKED JPEGS: each net's step fed by the packed squares against the same step at the same
    resolution fed by JPEG folders (scale, crop and test size scaled by R/224), `--workers` decoding."""
    packed, jpegs = args.imagenet
    size = args.size
    resolution = round(size * 224 / 256)
    ratio = resolution / 224
    jpeg = [f"data.root={jpegs}", f"data.workers={args.workers}", f"data.crop={resolution}"]
    jpeg += [f"data.scale=[{round(256 * ratio)},{round(480 * ratio)}]", f"data.test_size={round(256 * ratio)}"]
    table = Table(title=f"ms per step, batch {args.batch_size}, {resolution}x{resolution}, {device}")
    for column in ("net", f"JPEGs ({args.workers} workers)", "packed", "speed-up", "images/s (packed)"):
        table.add_column(column, justify="right")
    for net in args.nets:
        fed = imagenet_ms(net, "imagenet", jpeg, args, device)
        held = imagenet_ms(net, "imagenet_packed", [f"data.root={packed}", f"data.size={size}"], args, device)
        table.add_row(net, f"{fed:.1f}", f"{held:.1f}", f"{fed / held:.1f}x", f"{1000 * args.batch_size / held:,.0f}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nets",
        nargs="+",
        default=["resnet20", "resnet56", "resnet110", "plain56"],
        help="CIFAR nets: resnetN or plainN",
    )
    parser.add_argument("--steps", type=int, default=200, help="timed steps per net and path")
    parser.add_argument(
        "--warmup", type=int, default=10, help="untimed steps first (CUDA graph capture, compilation, worker start)"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (the paper: 128)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader worker processes of the common recipe")
    parser.add_argument("--compile", action="store_true", help="also time resexp's step with compile=true")
    parser.add_argument(
        "--group",
        type=int,
        default=0,
        metavar="K",
        help="also time K runs of each net as one grouped network (group_runs)",
    )
    parser.add_argument(
        "--twins",
        action="store_true",
        help="also time each net grouped with its plain/residual twin (group_runs), and the nets at once so",
    )
    parser.add_argument(
        "--grad-norms-every",
        type=int,
        default=0,
        metavar="K",
        help="also time resexp's step with the gradient norms read every K steps (the grad_norms_every key)",
    )
    parser.add_argument("--no-common", action="store_true", help="skip the common recipe (resexp's paths only)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--imagenet",
        nargs=2,
        metavar=("PACKED", "JPEGS"),
        help="instead: ImageNet nets (--nets plain18 ... resnet34) fed by packed squares against JPEG folders",
    )
    parser.add_argument("--size", type=int, default=128, help="with --imagenet: S of the packed files (128: R=112)")
    parser.add_argument("--classes", type=int, default=1000, help="with --imagenet: the folders' classes (1000)")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.backends.cudnn.benchmark = True  # as resexp train sets it; the common recipe gets it too
    if args.imagenet:
        return imagenet_table(args, device)

    rows = []
    for net in args.nets:
        row = {"net": net, "common_ms": math.nan if args.no_common else common_ms(net, args, device)}
        row["resexp_ms"] = timed(fast_steps(net, args, device, False), args.steps, args.warmup, device)
        if args.grad_norms_every:  # the cost of grad_norms_every: the same step, the norms read now and then
            row["grad_norms_ms"] = timed(fast_steps(net, args, device, False, True), args.steps, args.warmup, device)
            row["grad_norms_overhead_pct"] = 100 * (row["grad_norms_ms"] / row["resexp_ms"] - 1)
        if args.compile:
            row["resexp_compile_ms"] = timed(fast_steps(net, args, device, True), args.steps, args.warmup, device)
        if args.group:  # per run: the group's step time over its runs
            row["grouped_ms_per_run"] = (
                timed(grouped_steps([net] * args.group, args, device), args.steps, args.warmup, device) / args.group
            )
        if args.twins:
            row["twins_ms_per_run"] = (
                timed(grouped_steps([net, twin_of(net)], args, device), args.steps, args.warmup, device) / 2
            )
        row["speedup"] = row["common_ms"] / min(row["resexp_ms"], row.get("resexp_compile_ms", float("inf")))
        rows.append(row)
        Console().print(row)
    together = {
        "nets": args.nets,
        "ms": together_ms(args.nets, args, device, False),
        "sum_of_alone_ms": sum(row["resexp_ms"] for row in rows),
    }
    if args.twins:
        together["twins_grouped_ms"] = together_ms(args.nets, args, device, True)

    table = Table(title=f"ms per training step, batch {args.batch_size}, {device}")
    grouped = [f"resexp, {args.group} seeds grouped (per run)"] * bool(args.group) + [
        "resexp, with its twin grouped (per run)"
    ] * args.twins
    for column in (
        "net",
        "common recipe",
        "resexp",
        *(["resexp + compile"] if args.compile else []),
        *grouped,
        *([f"gradient norms every {args.grad_norms_every} (+%)"] if args.grad_norms_every else []),
        "speed-up",
        "images/s (resexp)",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        best = min(row["resexp_ms"], row.get("resexp_compile_ms", float("inf")))
        compiled = [f"{row['resexp_compile_ms']:.2f}"] if args.compile else []
        grouped = [f"{row[key]:.2f}" for key in ("grouped_ms_per_run", "twins_ms_per_run") if key in row]
        table.add_row(
            row["net"],
            f"{row['common_ms']:.2f}",
            f"{row['resexp_ms']:.2f}",
            *compiled,
            *grouped,
            *([f"{row['grad_norms_overhead_pct']:+.2f}"] if args.grad_norms_every else []),
            f"{row['speedup']:.1f}x",
            f"{1000 * args.batch_size / best:,.0f}",
        )
    Console().print(table)
    Console().print(
        f"all {len(args.nets)} at once (one thread and CUDA stream each): {together['ms']:.2f} ms per step of all, "
        f"against {together['sum_of_alone_ms']:.2f} one after another ({together['sum_of_alone_ms'] / together['ms']:.2f}x)"
    )
    if args.twins:
        Console().print(
            f"the same with the nets of each depth as one grouped network: {together['twins_grouped_ms']:.2f} ms per step of all"
        )
    if args.json:
        result = {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "batch_size": args.batch_size,
            "steps": args.steps,
            "rows": rows,
            "together": together,
        }
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
