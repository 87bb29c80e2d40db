"""Several runs of one net's layers trained as one network on one GPU: runs that differ only in their
seed, and plain nets beside their residual twins where the shortcuts are option A's (no parameters).

The paper reports its CIFAR nets over five runs (Table 6: ResNet-110 "best (mean±std)"), and at batch
128 one such net leaves most of a GPU idle: its kernels are small. K copies of a net side by side,
every convolution grouped (groups=K), every BN over K times the channels, make one network whose
kernels are K times larger and launch as often as one copy's. Throwaway prototypes of such K-copy
nets, CUDA-graphed on an H100, ran at 1.4x (K=2) to 2.4x (K=4-8) the throughput per net of one copy
(not yet timed for this code: scripts/benchmark.py --group K --twins). On the CPU it is slower than the
copies one by one.

Fig. 6 and Table 2 compare plain and residual nets of equal depth: the same layers, differing only in
the skip connections (§3.3). With option A's shortcuts (identity and zero padding, no weights) a plain
net is a copy of its residual twin whose shortcuts output zero (MaskedShortcut), so a single-seed Fig. 6
sweep trains as four plain/residual pairs and ResNet-110 rather than nine nets.

The copies stay separate experiments: copy k sees only run k's batches (its block of input channels),
its loss is run k's alone, and its own optimizer updates it with its own learning rate (ResNet-110's
warm-up ends at a different iteration per seed). Each run keeps its model and optimizer: its model's
tensors become views of its slice of the group's, so evaluation, checkpoints and metrics work on the
run as if it trained alone. Each run trains in its own thread (hydra_plugins/resexp_launcher/); its
step waits for the others' (Lockstep) and the last to arrive runs the group's step for all.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resexp.step import EagerStep, Stats, Step, at_least_fp32, autocast, fastest, on_stream, set_lr


class MaskedShortcut(nn.Module):
    """A parameter-free shortcut of a group where only some copies are residual: the plain copies' part
    of it is zero, so their blocks compute F(x) alone, as the plain twin's would (§3.3)."""

    def __init__(self, shortcut: nn.Module, residual: Sequence[bool], device: torch.device) -> None:
        super().__init__()
        self.shortcut = shortcut
        # (K, 1, 1, 1): broadcast over each copy's block of channels; not saved, it is not a weight.
        self.register_buffer("gate", torch.tensor(residual, device=device).view(-1, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shortcut(x).unflatten(1, (len(self.gate), -1))  # (B, K, C, H, W)
        return torch.where(self.gate, out, 0.0).flatten(1, 2)  # where, not a product: keeps bf16 as bf16


class GroupedLinear(nn.Conv2d):
    """K fully connected layers as one grouped 1x1 convolution: (B, K * in) to (B, K * out)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, :, None, None]).flatten(1)


def grouped_module(parts: Sequence[nn.Module]) -> nn.Module | None:
    """One module doing the work of `parts` (the same layer of each copy) side by side along the
    channels, holding their weights; None where the layer holds nothing and works per channel anyway."""
    first, copies = parts[0], len(parts)
    factory = {"device": first.weight.device, "dtype": first.weight.dtype} if hasattr(first, "weight") else {}
    if isinstance(first, nn.Conv2d):
        group = nn.Conv2d(
            copies * first.in_channels,
            copies * first.out_channels,
            first.kernel_size,
            first.stride,
            first.padding,
            groups=copies * first.groups,
            bias=first.bias is not None,
            **factory,  # the parts' device and dtype
        )
    elif isinstance(first, nn.BatchNorm2d):
        group = nn.BatchNorm2d(copies * first.num_features, first.eps, first.momentum, **factory)
        group.num_batches_tracked = first.num_batches_tracked.clone()  # one count: the copies step together
    elif isinstance(first, nn.Linear):
        group = GroupedLinear(
            copies * first.in_features,
            copies * first.out_features,
            1,
            groups=copies,
            bias=first.bias is not None,
            **factory,
        )
    elif hasattr(first, "grouped"):  # a family's own parameter-free layer, which knows its group's layout
        return first.grouped(copies)
    elif next(first.parameters(recurse=False), None) is None and next(first.buffers(recurse=False), None) is None:
        return None
    else:
        raise TypeError(f"cannot group {type(first).__name__} layers")
    with torch.no_grad():
        for name, tensor in itertools.chain(group.named_parameters(), group.named_buffers()):
            if name != "num_batches_tracked":
                tensor.copy_(torch.cat([getattr(part, name).reshape(-1, *tensor.shape[1:]) for part in parts]))
    return group


def masked_shortcut(parts: Sequence[nn.Module | None], device: torch.device) -> MaskedShortcut:
    """The shortcut of a block in a group of plain (None: no shortcut) and residual copies."""
    shortcut = next(part for part in parts if part is not None)
    if next(shortcut.parameters(), None) is not None:
        raise TypeError(
            f"cannot group plain nets with residual ones whose shortcuts have weights ({type(shortcut).__name__}); only option A's can be masked"
        )
    grouped = grouped_module([shortcut] * len(parts))  # option A's zero padding for every copy
    return MaskedShortcut(nn.Identity() if grouped is None else grouped, [part is not None for part in parts], device)


def layer(model: nn.Module, name: str) -> nn.Module | None:
    """model's layer called `name`, or None where it has none (a plain net's shortcuts)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def slice_of(whole: torch.Tensor, k: int, copies: int, shape: torch.Size) -> torch.Tensor:
    """Copy k's part of a grouped tensor (its rows of dim 0) in copy k's shape: a view, not a copy."""
    return whole if whole.dim() == 0 else whole.unflatten(0, (copies, -1))[k].view(shape)


def group_network(models: Sequence[nn.Module]) -> nn.Module:
    """The grouped network of `models` (nets of the same layers, some perhaps plain), holding their current
    weights and statistics; from now on each model's tensors are views of its slice of it, so training it
    trains them."""
    net = copy.deepcopy(max(models, key=lambda model: len(list(model.modules()))))  # a residual one, if any
    device = next(net.parameters()).device
    for name in [name for name, _ in net.named_modules()]:
        parts = [layer(model, name) for model in models]
        if None in parts:
            net.set_submodule(name, masked_shortcut(parts, device))
        elif (group := grouped_module(parts)) is not None:
            net.set_submodule(name, group)
    net.to(memory_format=torch.channels_last)  # the layout of the images (step.to_device)
    wholes = dict(itertools.chain(net.named_parameters(), net.named_buffers()))
    for k, model in enumerate(models):
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            tensor.data = slice_of(wholes[name].detach(), k, len(models), tensor.shape)
    return net


def group_step_function(
    net: nn.Module,
    forward: nn.Module,
    models: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    precision: str,
    skip_nonfinite: bool,
) -> Callable[[torch.Tensor, torch.Tensor], Stats]:
    """step_function for a group: x (B, K * C, H, W) holds run k's images in channel block k, y (K, B)
    its labels; returns each run's (summed loss, wrong predictions, images) as a (K, 3) tensor."""
    copies = len(models)
    wholes = dict(net.named_parameters())
    links = [(k, param, wholes[name]) for k, model in enumerate(models) for name, param in model.named_parameters()]

    def step(x: torch.Tensor, y: torch.Tensor) -> Stats:
        with autocast(x.device, precision):
            out = forward(x)  # (B, K * num_classes)
        out = at_least_fp32(out).unflatten(1, (copies, -1)).transpose(0, 1)  # (K, B, num_classes)
        losses = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").unflatten(0, y.shape).mean(1)
        losses.sum().backward()  # the sum: each copy's gradient is its own run's loss's
        for k, param, whole in links:
            param.grad = slice_of(whole.grad, k, copies, param.shape)
        updates = torch.isfinite(losses).tolist() if skip_nonfinite else [True] * copies
        for optimizer, update in zip(optimizers, updates):
            if update:
                optimizer.step()
        wrong = (out.argmax(2) != y).sum(1).to(losses.dtype)
        return torch.stack([losses.detach() * y.shape[1], wrong, torch.full_like(wrong, y.shape[1])], 1)

    return step


def make_group_step(
    models: Sequence[nn.Module],
    optimizers: Sequence[torch.optim.Optimizer],
    batch_shape: tuple[int, ...],
    *,
    precision: str,
    cuda_graph: bool,
    compile_model: bool = False,
    skip_nonfinite: bool = False,
) -> Step:
    """make_step for K runs of one net's layers: the step of their grouped network, taking (B, K * C, H, W)
    images and (K, B) labels. Build it after restoring the runs' checkpoints."""
    net = group_network(models)
    forward = torch.compile(net) if compile_model else net
    eager = EagerStep(group_step_function(net, forward, models, optimizers, precision, skip_nonfinite), net)
    batch, channels, *size = batch_shape
    return fastest(
        eager,
        optimizers,
        (batch, len(models) * channels, *size),
        (len(models), batch),
        cuda_graph and not skip_nonfinite,
        compile_model,
    )


class Lockstep:
    """The runs of a group train in threads of their own and call `step(k, x, y)` with their batch; the
    last to arrive runs the group's step for all, and each gets its own row of the result (overwritten
    at the next group step, as a GraphedStep's). A run that ends leaves (`leave`), and the others go on
    without it: its copy rides along with a learning rate of zero, so it stays as the run left it.

    `stops` is what the runs must read as their stop requests (train.stop_requests): `signals` as of
    the last group step, so every run of the group sees a stop after the same iteration and their
    checkpoints stay at one iteration, ready to be grouped again on resume."""

    def __init__(self, step: Step, optimizers: Sequence[torch.optim.Optimizer], signals: list[int]) -> None:
        self.group_step, self.optimizers, self.signals = step, optimizers, signals
        self.stream: torch.cuda.Stream | None = None  # the group's CUDA stream beside other trainings (jobs.run_steps)
        self.stops: list[int] = []
        self.batches: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(optimizers)
        self.running, self.arrived = set(range(len(optimizers))), set()
        self.rounds, self.result, self.error = 0, None, None
        self.condition = threading.Condition()

    def step(self, k: int, x: torch.Tensor, y: torch.Tensor) -> Stats:
        with self.condition:
            self.batches[k] = (x, y)
            self.arrived.add(k)
            rounds = self.rounds
            if self.arrived >= self.running:
                self.run()
            else:
                self.condition.wait_for(lambda: self.rounds != rounds)
            if self.error is not None:
                raise self.error
            return self.result[k]

    def leave(self, k: int) -> None:
        with self.condition:
            self.running.discard(k)
            set_lr(self.optimizers[k], 0.0)
            if self.running and self.arrived >= self.running:
                self.run()

    def run(self) -> None:
        """The group step, on the batches that arrived; a run that left, or never came, gives its last
        batch or zeros (its copy does not learn from them)."""
        x, y = next(batch for batch in self.batches if batch is not None)
        batches = [batch or (torch.zeros_like(x), torch.zeros_like(y)) for batch in self.batches]
        try:
            # on the group's stream, whichever run's thread runs it, in whatever stream that thread is: one
            # that leaves the group does so after its training's stream context has ended
            with on_stream(self.stream):
                self.result = self.group_step(
                    torch.cat([x for x, _ in batches], 1), torch.stack([y for _, y in batches])
                )
        except BaseException as error:  # every waiting run raises it, not only the one that ran the step
            self.error = error
        self.stops[:] = self.signals
        self.rounds += 1
        self.arrived.clear()
        self.condition.notify_all()
