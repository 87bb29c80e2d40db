"""A net's error on held-out images, the training loop's metric: during training, and for `resexp eval`
and `resexp analyze` after it (resexp/saved_commands.py, resexp/probes.py)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from resexp.distributed import all_sum
from resexp.step import at_least_fp32, autocast, to_device


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """Top-1 and top-5 error (%) and mean cross-entropy over all batches, and the views per image. A
    batch of several views per image, (B, V, 3, H, W), is scored by the mean of the views' softmax
    (10-crop testing, §3.4). Under several processes each scores its shard of the batches, and the
    counts are summed over them (resexp/distributed.py)."""
    model.eval()
    views = 1
    totals = torch.zeros(4, device=device)  # loss sum, top-1 wrong, top-5 wrong, images
    for x, y in batches:
        views = x.shape[1] if x.dim() == 5 else 1
        x, y = to_device(x.flatten(0, x.dim() - 4), y, device)
        with autocast(device, precision):
            out = model(x)
        # log of the mean probability over the views; one view: log_softmax itself
        log_p = at_least_fp32(out).log_softmax(1).unflatten(0, (len(y), views)).logsumexp(1) - math.log(views)
        totals[0] += nn.functional.nll_loss(log_p, y, reduction="sum")
        totals[1] += (log_p.argmax(1) != y).sum()
        totals[2] += (log_p.topk(min(5, log_p.shape[1]), 1).indices != y[:, None]).all(1).sum()
        totals[3] += len(y)  # a Python number: no host-to-device copy, no sync
    model.train()
    loss_sum, wrong, wrong5, seen = all_sum(totals).tolist()
    return {"error": 100 * wrong / seen, "error_top5": 100 * wrong5 / seen, "loss": loss_sum / seen, "views": views}
