"""One training step (forward, loss, backward, SGD update) and what makes it fast on a GPU.

At the paper's batch of 128, a CIFAR ResNet on a modern GPU waits on kernel launches, not arithmetic:
ResNet-110 issues about two thousand small kernels per step. So on CUDA the whole step is captured
once as a CUDA graph and replayed, one launch per step, with bf16 autocast and channels_last. The
graph reads its inputs, and the learning rate, from fixed device tensors: a new batch is copied into
them and a new rate is written into the optimizer's lr tensor, so schedule changes take effect
without capturing again. On the CPU (and with on_nonfinite=skip, which must look at each loss before
updating) the same step function runs eagerly.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from resexp import distributed
from resexp.errors import first_line

log = logging.getLogger("resexp")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
EAGER_STEPS_BEFORE_CAPTURE = 3  # warm-up before capture (torch.cuda.graphs docs: a few iterations on a side stream)
# under DDP: "at least 11 DDP-enabled eager iterations" (torch.cuda.graphs docs, "Usage with DistributedDataParallel")
EAGER_STEPS_BEFORE_CAPTURE_DDP = 11
CUBLAS_WORKSPACE = ":4096:8"  # eight 4 MiB workspaces per cuBLAS handle: its deterministic configuration

# What a step returns, on the device: (summed loss, wrong predictions, images) of its batch, to add up
# between log points without a host sync.
Stats = torch.Tensor


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # channels_last (NHWC) lets the convolution kernels skip layout transposes: measured 12% faster
    # training and 27% faster evaluation for ResNet-20 on a 2-core CPU; GPUs gain more.
    x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def choose_algorithms(deterministic: bool, precision: str = "fp32") -> None:
    """cuDNN autotuning (fixed input shapes: it picks the fastest kernels once), or, for `deterministic`,
    torch's deterministic algorithms: on a GPU two runs of one seed then agree bit for bit. An op with no
    deterministic version warns rather than ending the run. And fp32 as fp32: CUDA's convolutions would
    run in TensorFloat-32 (10 bits of mantissa) by default; bf16 runs keep TF32 for what autocast leaves in
    fp32. All of these are the process's, not a run's: runs trained at once share them (jobs.train)."""
    if deterministic:
        # what deterministic cuBLAS needs, before cuBLAS first runs (resexp/cli.py sets it at the start)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"


def autocast(device: torch.device, precision: str) -> ContextManager:
    """Mixed precision for the forward pass; fp32 is no autocast at all. `cache_enabled=False` because
    autocast's weight cache must not outlive a graph capture (torch.cuda.graphs docs)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision], cache_enabled=False)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: autocast's bf16 up to fp32, where softmax and its sums keep their precision;
    fp32 and fp64 as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def use_lr_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Hold each group's learning rate in a device tensor and use the fused SGD kernel, which reads it
    there: a captured step then follows the schedule (set_lr writes into the tensor). make_step calls
    it after any checkpoint is restored, since optimizer.load_state_dict puts back plain values."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        group["fused"], group["foreach"] = True, False


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"].fill_(lr)  # in place: a captured graph reads this very tensor


def step_function(
    forward: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    precision: str,
    skip_nonfinite: bool = False,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], Stats]:
    """The training step as a function of one batch, which `prepare` (the data's transform, if any) first
    makes the net's input: inside the step, so that a CUDA graph captures it too. Gradients must be None (zero_grad(set_to_none=True))
    when it starts: backward then writes them instead of adding to them. With `skip_nonfinite`, a
    non-finite loss leaves the weights alone (a host sync per step, so never captured); under several
    processes, a non-finite loss on any of them (all skip together: DDP's backward waits for every rank)."""

    def step(x: torch.Tensor, y: torch.Tensor) -> Stats:
        x = x if prepare is None else prepare(x)  # in fp32: autocast is for the net
        with autocast(x.device, precision):
            out = forward(x)  # (B, num_classes)
        loss = nn.functional.cross_entropy(at_least_fp32(out), y)
        if not skip_nonfinite or not distributed.any_rank(not torch.isfinite(loss), loss.device):
            loss.backward()
            optimizer.step()
        wrong = (out.argmax(1) != y).sum().to(loss.dtype)
        return torch.stack([loss.detach() * len(y), wrong, torch.full_like(wrong, len(y))])

    return step


class EagerStep:
    """The step run op by op: CPU, and every step whose loss must be checked before the update.
    `step` is a step function (step_function, or group.group_step_function for several runs at once);
    `model` holds the parameters it differentiates, whose gradients each call clears first."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], Stats], model: nn.Module) -> None:
        self.step, self.model = step, model

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Stats:
        self.model.zero_grad(set_to_none=True)
        return self.step(x, y)


def warm_up(
    eager: EagerStep, optimizers: Sequence[torch.optim.Optimizer], x: torch.Tensor, y: torch.Tensor, steps: int
) -> None:
    """A few eager steps before a capture, on a side stream (torch.cuda.graphs docs): cuDNN picks its kernels,
    the optimizer makes its momentum buffers (DDP its buckets). They are undone. An error here is the
    step's own (a bug, bad settings), raised as it is."""
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side), undone(eager.model, *optimizers):
        for _ in range(steps):
            eager(x, y)
    torch.cuda.current_stream(x.device).wait_stream(side)


class GraphedStep:
    """The step as one CUDA graph, captured when built and replayed at every call: a copy of the batch
    into the graph's fixed inputs and one launch. The results it returns are overwritten by the next
    call. Build it before training starts, and before other threads train: no other work may reach the
    GPU during a capture (a shared-GPU sweep builds its runs' steps one after another)."""

    def __init__(self, eager: EagerStep, x: torch.Tensor, y: torch.Tensor) -> None:
        """Capture `eager` on the batch (x, y), after warm_up."""
        self.eager = eager
        self.x, self.y = x.clone(), y.clone()  # the graph's inputs, fixed in memory from now on
        self.graph = torch.cuda.CUDAGraph()
        eager.model.zero_grad(set_to_none=True)  # the captured backward allocates and writes them
        # A capture stream of its own for each graph (torch.cuda.graph shares one by default): cuBLAS keys
        # its workspaces by stream, and the runs of a shared-GPU batch replay their graphs at once, on
        # streams of their own (pytorch/pytorch#193402 reports graphs sharing one).
        self.capture_stream = torch.cuda.Stream(x.device)
        with torch.cuda.graph(self.graph, stream=self.capture_stream):
            self.result = eager.step(self.x, self.y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Stats:
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.result


def rng_states() -> dict[str, Any]:
    """torch's generators, the CPU's and each GPU's: what dropout draws its masks from."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def undone(model: nn.Module, *optimizers: torch.optim.Optimizer) -> Iterator[None]:
    """The steps taken inside leave no trace: weights, BN statistics and momentum are put back in place
    (the same tensors, which a graph captured afterwards reads), and torch's generators where they were
    (dropout's masks), so warm-up steps change nothing."""
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    params = [(optimizer, p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]]
    momenta = [optimizer.state.get(p, {}).get("momentum_buffer") for optimizer, p in params]
    momenta = [None if m is None else m.clone() for m in momenta]
    drawn = rng_states()  # dropout's masks
    yield
    restore_rng_states(drawn)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(weights[name])
        for (optimizer, p), saved in zip(params, momenta):
            buffer = optimizer.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:  # no momentum before: zeros make the next update what a first one is
                buffer.zero_() if saved is None else buffer.copy_(saved)


Step = EagerStep | GraphedStep


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_shape: tuple[int, ...],
    *,
    precision: str,
    cuda_graph: bool,
    compile_model: bool = False,
    skip_nonfinite: bool = False,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_dtype: torch.dtype | None = None,
) -> Step:
    """The fastest step that can run here: a CUDA graph on CUDA when asked for and possible, else eager.
        `batch_shape` (B, C, H, W) sizes the graph's inputs: this process's share of the batch. Under several
        processes the forward pass is DDP's (resexp/distributed.py), built on the stream that a capture then
        follows, and a capture that fails (a torch or NCCL that cannot capture DDP's allreduce) trains eagerly
        on every rank, saying why. `compile_model` puts torch.compile's fused kernels (BN, ReLU and the addition
        in one) inside the step. `prepare` makes each batch, of `batch_dtype` where that is not the net's, the
    net's input inside the step (Data.transform). Build it after restoring a checkpoint."""
    graph = cuda_graph and not skip_nonfinite and next(model.parameters()).is_cuda
    ddp = graph and torch.distributed.is_initialized()

    def eager_step() -> EagerStep:
        # "DDP must be constructed in a side-stream context" for a capture (torch.cuda.graphs docs)
        side = torch.cuda.Stream() if ddp else None
        with on_stream(side):
            forward = distributed.parallel(model)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        forward = torch.compile(forward) if compile_model else forward
        return EagerStep(step_function(forward, optimizer, precision, skip_nonfinite, prepare), model)

    eager = eager_step()
    if not ddp:
        return fastest(eager, [optimizer], batch_shape, (batch_shape[0],), graph, compile_model, batch_dtype)
    inputs = graph_inputs(model, batch_shape, (batch_shape[0],), batch_dtype)
    use_lr_tensors(optimizer, inputs[0].device)
    warm_up(eager, [optimizer], *inputs, EAGER_STEPS_BEFORE_CAPTURE_DDP)  # its errors are the step's: raised
    if (step := captured_on_every_rank(functools.partial(GraphedStep, eager, *inputs), inputs[0].device)) is not None:
        return step
    # Eager, with a DDP made anew: a capture that failed mid-backward left the reducer in the middle of an
    # iteration, and the old DDP's hooks go with it.
    del eager
    return eager_step()


def captured_on_every_rank(capture: Callable[[], Step], device: torch.device) -> Step | None:
    """`capture()` (DDP's step as a CUDA graph), or None where the capture itself raises a RuntimeError on
    any rank (a torch or NCCL that cannot capture DDP's allreduce), said in one log line: the ranks agree
    first, since a rank training eagerly beside others that replay graphs would wait for them forever.
    Any other error is raised."""
    try:
        step, reason = capture(), None
    except RuntimeError as error:
        step, reason = None, first_line(error)
    if not distributed.any_rank(reason is not None, device):
        return step
    log.warning(
        "the CUDA graph of the DDP step could not be captured (%s); training eagerly, several times slower",
        reason or "on another rank",
    )
    return None


def graph_inputs(
    model: nn.Module, x_shape: tuple[int, ...], y_shape: tuple[int, ...], x_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch for warming up and capturing (any will do: undone): zeros of `x_dtype`, or of the parameters'
    float type (a float64 net's in the tests), in their layout, on their device. The graph's inputs keep that
    type: each batch is copied into them."""
    parameter = next(model.parameters())
    x = torch.zeros(x_shape, device=parameter.device, dtype=x_dtype or parameter.dtype).contiguous(
        memory_format=torch.channels_last
    )
    return x, torch.zeros(y_shape, dtype=torch.int64, device=parameter.device)


def fastest(
    eager: EagerStep,
    optimizers: Sequence[torch.optim.Optimizer],
    x_shape: tuple[int, ...],
    y_shape: tuple[int, ...],
    cuda_graph: bool,
    compiled: bool = False,
    x_dtype: torch.dtype | None = None,
) -> Step:
    """`eager` captured as a CUDA graph when asked for and on CUDA, else itself; the optimizers read
    their rates from device tensors either way (use_lr_tensors). A `compiled` step that stays eager is
    compiled here, by one step undone: in the thread that builds it, before the runs of a shared-GPU batch
    train in threads of their own, which would otherwise all compile at once (Dynamo is not made for
    concurrent first compiles)."""
    device = next(eager.model.parameters()).device
    for optimizer in optimizers:
        use_lr_tensors(optimizer, device)
    inputs = graph_inputs(eager.model, x_shape, y_shape, x_dtype)
    if not cuda_graph or device.type != "cuda":
        if compiled:
            with undone(eager.model, *optimizers):
                eager(*inputs)
        return eager
    warm_up(eager, optimizers, *inputs, EAGER_STEPS_BEFORE_CAPTURE)
    return GraphedStep(eager, *inputs)


def new_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A CUDA stream for a run (or a group) training beside others, after the work that built it on the
    default stream; None off CUDA."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def on_stream(stream: torch.cuda.Stream | None) -> ContextManager:
    """Work inside goes to `stream` (None: wherever it would)."""
    return nullcontext() if stream is None else torch.cuda.stream(stream)
