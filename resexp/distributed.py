"""One run over several processes with torch.distributed: DistributedDataParallel, one process ("rank")
per device, started by torchrun (`torchrun --nproc-per-node=N -m resexp train ...`) or by SLURM through
submitit (conf/hydra/launcher/slurm.yaml: one task per GPU).

What changes under N processes, and where:
- the batch: `schedule.batch_size` stays the global batch of the paper's recipe; each rank trains on its
  N-th of every batch (config.py refuses a batch that N does not divide);
- the data: every rank draws the same global stream (one permutation per epoch, one crop and flip per
  image of the global batch) and keeps its slice, so the union over ranks is the single-process epoch
  (resexp/data/);
- the step: DDP averages the gradients (resexp/step.py), and `sync_bn` normalizes over the global batch;
- the numbers: training sums and evaluation counts are summed over ranks (`all_sum`), evaluation is
  sharded;
- the files: rank 0 alone writes TensorBoard, metrics.json, checkpoints, logs and locks; the others log
  their warnings to the console.
A process started any other way is a world of one, and none of this runs.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from resexp.errors import ResexpError
from resexp.launch import LAUNCHED

log = logging.getLogger("resexp")


@dataclass(frozen=True)
class World:
    """This process's place among the processes that train one run."""

    rank: int = 0  # 0 writes the run's files
    size: int = 1  # processes in all
    local_rank: int = 0  # on this node: which device it takes
    launcher: str = ""  # what started it: torchrun, slurm, or "" (alone)

    @property
    def main(self) -> bool:
        return self.rank == 0


WORLD = World()  # this process's, once `start` has run
STARTED: datetime.datetime | None = None  # rank 0's start time, which names the run's directory on every rank


def from_env(environ: dict[str, str]) -> World:
    """The world that the environment describes: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, as
    for torch.distributed's env:// start), or a task of a SLURM job that submitit started with more than
    one task (SUBMITIT_EXECUTOR=slurm, SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). Anything else: alone."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return World(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)), "torchrun")
    # A SLURM batch script runs as task 0 of all the job's tasks: only a task of submitit's srun is a rank.
    if environ.get("SUBMITIT_EXECUTOR") == "slurm" and int(environ.get("SLURM_NTASKS", 1)) > 1:
        return World(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ["SLURM_LOCALID"]), "slurm")
    return World()


def start(environ: dict[str, str] | None = None) -> World:
    """Join the other processes of the run, where the environment says there are any: the process group
    (gloo for CPU tensors, and NCCL for CUDA tensors where there is CUDA), this rank's GPU, and rank 0's
    start time. Once per process; later calls return the same world."""
    global WORLD, STARTED
    environ = os.environ if environ is None else environ
    world = from_env(environ)
    if world.size == 1 or dist.is_initialized():
        return WORLD
    if world.launcher == "slurm":  # MASTER_ADDR and the rest for env://, from SLURM's variables
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    cuda = torch.cuda.is_available() and dist.is_nccl_available()
    if cuda:
        graph_safe_nccl(environ)
        torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    # Freed before the interpreter's teardown, which would otherwise end a process that finished its
    # run with an abort from gloo's threads now and then ("terminate called without an active exception")
    atexit.register(leave)
    WORLD = world
    started = [datetime.datetime.now()]
    dist.broadcast_object_list(started, src=0)  # ${resexp.now:} (resexp/resolvers.py), Hydra issue #2070
    STARTED = started[0]
    return WORLD


def graph_safe_nccl(environ: dict[str, str]) -> None:
    """NCCL's settings for an allreduce captured in a CUDA graph (the DDP step, resexp/step.py): the torch.cuda
    graphs docs ("Usage with DistributedDataParallel") ask for async error handling off, which torchrun
    turns on in every process it starts (TORCH_NCCL_ASYNC_ERROR_HANDLING=1), so that it is set here, not
    defaulted. Its cost: with it off, a rank whose peer died waits in its allreduce instead of raising,
    until the launcher stops it (torchrun stops the others when one process ends)."""
    environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "0"


def device(name: str) -> torch.device | None:
    """The device of this rank for the config's `device`, or None alone (config.pick_device decides)."""
    if WORLD.size == 1:
        return None
    if name not in ("auto", "cuda", "cpu"):
        raise ResexpError(
            f"device={name!r}, but under {WORLD.launcher} each process takes the GPU of its local rank; "
            "use device=auto, cuda or cpu"
        )
    if name == "cpu" or not torch.cuda.is_available():
        if name == "cuda":
            raise ResexpError("device='cuda' but CUDA is not available here; use device=auto or device=cpu")
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def command(environ: dict[str, str] | None = None) -> str:
    """How this process's run was started, for the commands that messages advise: `resexp train`, with the
    torchrun flags it was given (`resexp train --nproc-per-node=2`), or under torchrun its command with as
    many processes (with its node and rendezvous flags as before, where there are several nodes)."""
    environ = os.environ if environ is None else environ
    if WORLD.launcher != "torchrun":
        return "resexp train"
    if LAUNCHED in environ:  # resexp train --nproc-per-node=N (resexp/launch.py), with its flags
        return f"resexp train {environ[LAUNCHED]}"
    per_node = int(environ.get("LOCAL_WORLD_SIZE", WORLD.size))
    nodes = "" if per_node == WORLD.size else " --nnodes=... --rdzv-backend=... --rdzv-endpoint=... (as before)"
    return f"torchrun --nproc-per-node={per_node}{nodes} -m resexp train"


def local_batch(batch_size: int) -> int:
    """Each rank's share of the global batch, or a one-line error where the ranks cannot share it evenly."""
    if batch_size % WORLD.size:
        multiples = ", ".join(
            str(WORLD.size * k) for k in range(max(1, batch_size // WORLD.size), batch_size // WORLD.size + 3)
        )
        raise ResexpError(
            f"schedule.batch_size={batch_size} does not split over {WORLD.size} processes: it is the global batch, of "
            f"which each process takes an equal share; choose a multiple of {WORLD.size} ({multiples}, ...)"
        )
    return batch_size // WORLD.size


def refuse(what: str, instead: str) -> None:
    """A single-process feature asked for under several processes: one line."""
    if WORLD.size > 1:
        raise ResexpError(f"{what} trains in one process on one device, not under {WORLD.launcher}; {instead}")


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor summed over the ranks, in place (alone: itself)."""
    if WORLD.size > 1:
        dist.all_reduce(tensor)
    return tensor


def first_over_ranks(iteration: torch.Tensor) -> torch.Tensor:
    """The smallest nonzero value of a per-rank iteration counter (0: none), in place."""
    if WORLD.size > 1:
        big = torch.iinfo(iteration.dtype).max
        iteration.copy_(torch.where(iteration == 0, big, iteration))
        dist.all_reduce(iteration, op=dist.ReduceOp.MIN)
        iteration.copy_(torch.where(iteration == big, 0, iteration))
    return iteration


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether any rank says so (alone: `flag`). A stop request reaches each rank at its own step; they
    agree at a log point and stop there together."""
    if WORLD.size == 1:
        return flag
    return bool(all_sum(torch.tensor([float(flag)], device=device)).item())


def same_buffers(model: nn.Module) -> None:
    """Rank 0's BN statistics on every rank: without sync_bn each rank's running statistics follow its own
    images, and an evaluation, or a checkpoint, is of rank 0's (DDP's broadcast_buffers, made explicit)."""
    if WORLD.size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def same_on_every_rank(value: object, what: str) -> None:
    """Refuse, on every rank, where the ranks see different things (a run directory not shared by all nodes)."""
    if WORLD.size == 1:
        return
    seen: list[object] = [None] * WORLD.size
    dist.all_gather_object(seen, value)
    if any(other != seen[0] for other in seen):
        differ = next(rank for rank, other in enumerate(seen) if other != seen[0])
        raise ResexpError(
            f"rank 0 and rank {differ} see {what} differently ({seen[0]!r} and {seen[differ]!r}): the run "
            "directory must be on a file system that every node shares"
        )


def preemption_signal(environ: dict[str, str] | None = None) -> signal.Signals | None:
    """The signal by which submitit announces a time limit or a preemption (USR2 unless
    SUBMITIT_PREEMPT_SIGNAL says), inside a submitit job: the run checkpoints, then submitit requeues it."""
    environ = os.environ if environ is None else environ
    if not environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


class GlobalBatchNorm(nn.BatchNorm2d):
    """Batch normalization over the global batch on the CPU (gloo), which torch's SyncBatchNorm does not
    serve (GPU only): the per-channel sums are summed over the ranks by a differentiable all_reduce, so
    the backward pass sums the statistics' gradients over the ranks as well. The same state_dict as
    BatchNorm2d: a checkpoint does not depend on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or WORLD.size == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        local = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), x.new_tensor([x.numel() / x.shape[1]])])
        total = all_reduce(local)
        channels = x.shape[1]
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels : 2 * channels] / count - mean * mean  # biased: what normalizes (BN paper, Alg. 1)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)  # unbiased, as BatchNorm2d keeps
        scale = self.weight * torch.rsqrt(var + self.eps)
        return x * scale[None, :, None, None] + (self.bias - mean * scale)[None, :, None, None]


def sync_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with every BatchNorm2d normalizing over the global batch (the same parameters and buffers):
    torch's SyncBatchNorm on CUDA, GlobalBatchNorm elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            replaced = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, device=device, dtype=child.weight.dtype
            )
            replaced.load_state_dict(child.state_dict())
            replaced.weight, replaced.bias = child.weight, child.bias  # the very parameters an optimizer may hold
            setattr(model, name, replaced)
        else:
            sync_batch_norm(child, device)
    return model


def parallel(model: nn.Module) -> nn.Module:
    """The forward pass whose backward averages the gradients over the ranks (alone: the model itself).
    The model's weights and buffers start as rank 0's. Gradients are written as views of DDP's
    buckets: no copy, and the addresses a CUDA graph needs stay put. Wherever a process group runs (start
    makes one for two processes or more; a test may make one of a single rank)."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [model_device(model)] if model_device(model).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def leave() -> None:
    """Out of the process group, if still in it."""
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """The end of a run under several processes, finished or stopped at an agreed step: every rank waits for
    the others, then leaves the process group. A rank that left while another still spoke to it could end
    the other with an abort from gloo's threads ("terminate called without an active exception", seen
    after a stop). A rank already gone: the others leave all the same."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:
            pass
        leave()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
