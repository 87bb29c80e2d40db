"""Measurements of a net that say why residual learning works (`resexp analyze`), each a function of
a model and batches:

- layer responses (paper Fig. 7, §4.2): the standard deviation of each 3x3 layer's output after its BN
  and before the ReLU or the addition, in eval mode. Pooled per channel (over images and positions),
  then averaged over the layer's channels: the paper does not say how it pools;
- gradient flow: the norm of the loss's gradient for each 3x3 layer's weights (§4.1: "the backward
  propagated gradients exhibit healthy norms with BN");
- lesions (Veit et al. 2016): a block deleted, its residual branch gone and its shortcut kept; in a
  plain net, a block whose input and output have one shape, replaced by the identity;
- the loss along one filter-normalised random direction around the weights, or over the plane of two
  (Li et al. 2018).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from resexp.evaluate import evaluate
from resexp.models import responds_at_conv, units

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def response_layers(model: nn.Module) -> list[tuple[nn.Conv2d, nn.Module]]:
    """Each 3x3 convolution and the module whose output is its response, in forward order (the stem's
    on CIFAR; in a block, each 3x3 one): the layers of Fig. 7. In the paper's units that is the BN right
    after the conv; a pre-activation unit (He et al. 2016) has none, and its 3x3 conv's own output is
    what it adds or hands on, as a DenseNet layer's is the maps it adds. Shortcut projections (1x1) and
    ImageNet's 7x7 stem are no 3x3 layer."""
    if responds_at_conv(model):
        return [(m, m) for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    layers, conv = [], None
    for module in model.modules():  # registration order: conv1, bn1, conv2, bn2, then the shortcut
        if isinstance(module, nn.Conv2d):
            conv = module
        elif isinstance(module, _BatchNorm) and conv is not None:  # SyncBatchNorm under sync_bn too
            if conv.kernel_size == (3, 3):
                layers.append((conv, module))
            conv = None
    return layers


@torch.inference_mode()
def layer_responses(model: nn.Module, batches: Batches, device: torch.device) -> list[float]:
    """The std of each 3x3 layer's response (response_layers) over `batches`, per channel then averaged
    over channels, accumulated in float64; the model in eval mode (BN's running statistics), as at test
    time."""
    layers = [probe for _, probe in response_layers(model)]
    sums = [torch.zeros(3, conv.out_channels, dtype=torch.float64, device=device) for conv, _ in response_layers(model)]

    def keep(index: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor], out: torch.Tensor) -> None:
            x = out.double()
            sums[index] += torch.stack(
                [x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), torch.full_like(x[0, :, 0, 0], x[:, 0].numel())]
            )

        return hook

    handles = [probe.register_forward_hook(keep(index)) for index, probe in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches:
            model(x.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    stds = []
    for total, square, count in sums:
        mean = total / count
        stds.append((square / count - mean * mean).clamp_min(0).sqrt().mean().item())
    return stds


def gradient_norms(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device):
    """The L2 norm of the mean training loss's gradient for each 3x3 layer's weights, over `batches`, in
    train mode (BN over each batch, as in training): first layer first."""
    model.train()
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        loss = F.cross_entropy(model(x.to(device)), y.to(device)) / len(batches)
        loss.backward()
    norms = [conv.weight.grad.double().norm().item() for conv, _ in response_layers(model)]
    model.zero_grad(set_to_none=True)
    return norms


def stage_names(model: nn.Module, layers: list[tuple[nn.Conv2d, nn.Module]]) -> list[str]:
    """The part of the net each layer is in: stem, stage1, stage2, ... (the paper's conv1, conv2_x, ...)."""
    where = {module: "stem" for module in model.stem.modules()}
    for index, stage in enumerate(model.stages):
        where.update({module: f"stage{index + 1}" for module in stage.modules()})
    return [where[conv] for conv, _ in layers]


def step_gradient_norms(layers: list[tuple[nn.Conv2d, nn.Module]]) -> torch.Tensor | None:
    """The norms of the gradients that the last training step left in each layer's weights, on the
    device (a CUDA graph's replay leaves them in its own buffers, which stay the weights' .grad); None
    where the step left none (a skipped step, or weights that another module differentiates)."""
    grads = [conv.weight.grad for conv, _ in layers]
    if not grads or any(grad is None for grad in grads):
        return None
    return torch.stack(torch._foreach_norm(grads)).float()


def blocks(model: nn.Module) -> list[nn.Module]:
    return units(model)


def deletable(block: nn.Module) -> bool:
    """Whether a block can go: a residual block always (its shortcut stays); a plain one where its
    output has its input's shape, so that the identity can stand in for it."""
    if block.shortcut is not None:
        return True
    convs = [module for module in block.modules() if isinstance(module, nn.Conv2d)]
    return all(conv.stride == (1, 1) for conv in convs) and convs[0].in_channels == convs[-1].out_channels


@contextmanager
def lesioned(model: nn.Module, indices: Iterable[int]) -> Iterator[None]:
    """The model with the blocks at `indices` (of `blocks`) deleted: a residual block computes what it
    computes with its residual branch at zero (its `skip`: relu(shortcut(x)) in the paper's units, the
    shortcut alone in a pre-activation unit); a plain block passes x on."""
    chosen = [blocks(model)[index] for index in indices]
    for block in chosen:
        if not deletable(block):
            raise ValueError(f"block {block} cannot be deleted: its output is not of its input's shape")
        block.forward = block.skip if block.shortcut is not None else (lambda x: x)
    try:
        yield
    finally:
        for block in chosen:
            del block.forward  # the class's forward again


def lesion_study(
    model: nn.Module, batches: Batches, device: torch.device, draws: int, seed: int
) -> dict[str, list[float] | float]:
    """Test error (%) of the whole net, with each deletable block deleted alone (NaN where a block
    cannot go), and with k random deletable blocks deleted (k = 1..n, the mean over `draws` draws)."""
    batches = list(batches)
    base = evaluate(model, batches, device)["error"]
    candidates = [index for index, block in enumerate(blocks(model)) if deletable(block)]
    single = []
    for index in range(len(blocks(model))):
        if index not in candidates:
            single.append(math.nan)
            continue
        with lesioned(model, [index]):
            single.append(evaluate(model, batches, device)["error"])
    generator = torch.Generator().manual_seed(seed)
    by_count = []
    for k in range(1, len(candidates) + 1):
        errors = []
        for _ in range(draws if k < len(candidates) else 1):  # all of them: one way only
            picked = [candidates[i] for i in torch.randperm(len(candidates), generator=generator)[:k].tolist()]
            with lesioned(model, picked):
                errors.append(evaluate(model, batches, device)["error"])
        by_count.append(sum(errors) / len(errors))
    return {"error": base, "single": single, "deletable": candidates, "random": by_count}


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> list[torch.Tensor]:
    """A random direction in weight space, each filter (row of a conv's or the classifier's weight)
    scaled to the norm of the filter it moves (Li et al. 2018, §4); zero for BN's and the biases'
    parameters, as they do for BN."""
    direction = []
    for param in model.parameters():
        if param.dim() <= 1:
            direction.append(torch.zeros_like(param))
            continue
        d = torch.randn(param.shape, generator=generator, dtype=param.dtype).to(param.device)
        scale = param.flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1).clamp_min(1e-12)
        direction.append(d * scale.view(-1, *([1] * (param.dim() - 1))))
    return direction


@torch.no_grad()
def loss_surface(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    points: Sequence[Sequence[float]],
    seed: int,
) -> list[float]:
    """The mean training loss over `batches` at weights + sum_i c_i * d_i for each point c, the d_i
    filter-normalised random directions, as many as a point has coordinates, drawn in turn from one
    generator of `seed` (so a 1-D slice runs along the first direction of the 2-D surface of the same
    seed); the model in eval mode (BN's running statistics: one net at every point) and its weights as
    they were afterwards."""
    generator = torch.Generator().manual_seed(seed)
    directions = [filter_normalized_direction(model, generator) for _ in range(max(map(len, points), default=0))]
    params = list(model.parameters())
    start = [param.detach().clone() for param in params]
    losses = []
    try:
        for point in points:
            for index, (param, origin) in enumerate(zip(params, start)):
                param.copy_(origin)
                for c, direction in zip(point, directions):
                    param.add_(direction[index], alpha=c)
            losses.append(evaluate(model, batches, device)["loss"])
    finally:
        for param, origin in zip(params, start):
            param.copy_(origin)
    return losses
