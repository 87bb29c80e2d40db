"""The training step's semantics, on the CPU: what the CUDA graph captures is this same step, so what
must hold for it (the rate it reads, warm-up leaving no trace, SGD's exact update) is checked here."""

import copy

import pytest
import torch

from resexp.config import pick_precision
from resexp.errors import ResexpError
from resexp.models import build_model
from resexp.step import EagerStep, make_step, set_lr, step_function, undone, use_lr_tensors

CPU = torch.device("cpu")


# Float64 throughout where two computations of the same numbers are compared: each op rounds at 1e-16
# on any CPU, and a few steps through BN amplify that to about 1e-10; this tolerance still tells any
# other update apart (float32 would need 1e-4, which CPUs of other makes have been seen to break).
CLOSE = dict(rtol=1e-7, atol=1e-9)


def net_and_sgd(seed: int = 0, dtype: torch.dtype = torch.float64):
    torch.manual_seed(seed)
    model = build_model(8, True, "basic", "cifar", "identity", 10).to(dtype, memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def batch(seed: int, size: int = 16, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, 32, 32, generator=generator, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (size,), generator=generator)


def weights(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_the_step_is_sgd_with_momentum_and_weight_decay_as_the_paper():
    model, optimizer = net_and_sgd()
    reference = copy.deepcopy(model)
    step = make_step(model, optimizer, (16, 3, 32, 32), precision="fp32", cuda_graph=True)  # CPU: eager
    assert isinstance(step, EagerStep)
    velocity = {name: torch.zeros_like(p) for name, p in reference.named_parameters()}
    for seed, lr in ((1, 0.1), (2, 0.1), (3, 0.01)):
        set_lr(optimizer, lr)
        x, y = batch(seed)
        stats = step(x, y)
        loss = torch.nn.functional.cross_entropy(reference(x), y)
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        with torch.no_grad():
            for (name, p), g in zip(reference.named_parameters(), grads):
                velocity[name] = 0.9 * velocity[name] + g + 1e-4 * p  # torch's SGD: decay in the gradient
                p -= lr * velocity[name]
        assert stats[0].item() == pytest.approx(loss.item() * 16, rel=1e-7)
        assert stats[2].item() == 16
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, **CLOSE, msg=name)


def test_a_new_rate_written_into_the_lr_tensor_takes_effect_without_rebuilding_the_step():
    # A captured graph reads the lr tensor in place: set_lr must change that tensor, not replace it.
    model, optimizer = net_and_sgd()
    use_lr_tensors(optimizer, CPU)
    tensor = optimizer.param_groups[0]["lr"]
    step = step_function(model, optimizer, "fp32")
    for lr in (0.1, 0.0, 0.05):
        set_lr(optimizer, lr)
        assert optimizer.param_groups[0]["lr"] is tensor and tensor.item() == pytest.approx(lr)
        before = weights(model)
        optimizer.zero_grad(set_to_none=True)
        step(*batch(4))
        for name, p in model.named_parameters():  # SGD's update, p <- p - lr * momentum, at this very rate
            torch.testing.assert_close(p, before[name] - lr * optimizer.state[p]["momentum_buffer"], **CLOSE, msg=name)


def test_lr_tensors_survive_loading_a_checkpoint_of_plain_numbers():
    model, optimizer = net_and_sgd()
    saved = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()  # lr a float, as old checkpoints
    optimizer.load_state_dict(saved)
    use_lr_tensors(optimizer, CPU)
    group = optimizer.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["lr"].item() == pytest.approx(0.1) and group["fused"]


def test_warm_up_steps_before_capture_are_undone_exactly():
    # The graph's warm-up trains on a batch of zeros; undone() must leave weights, BN statistics and
    # momentum as they were, so that the run is the same as one without warm-up.
    warmed, warmed_sgd = net_and_sgd()
    plain, plain_sgd = net_and_sgd()
    for model, optimizer in ((warmed, warmed_sgd), (plain, plain_sgd)):
        use_lr_tensors(optimizer, CPU)
        EagerStep(step_function(model, optimizer, "fp32"), model)(*batch(5))  # a real step first: momentum exists
    before = weights(warmed)
    momentum = [warmed_sgd.state[p]["momentum_buffer"].clone() for p in warmed.parameters()]
    with undone(warmed, warmed_sgd):
        for _ in range(3):
            EagerStep(step_function(warmed, warmed_sgd, "fp32"), warmed)(
                torch.zeros(16, 3, 32, 32, dtype=torch.float64), torch.zeros(16, dtype=torch.int64)
            )
        assert any(not torch.equal(before[name], t) for name, t in warmed.state_dict().items())
    for name, tensor in warmed.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # running_mean/var and num_batches_tracked too
    assert all(torch.equal(warmed_sgd.state[p]["momentum_buffer"], m) for p, m in zip(warmed.parameters(), momentum))
    for model, optimizer in ((warmed, warmed_sgd), (plain, plain_sgd)):
        EagerStep(step_function(model, optimizer, "fp32"), model)(*batch(6))
    for (name, p), q in zip(warmed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_warm_up_on_a_fresh_optimizer_leaves_a_momentum_that_acts_as_none():
    # Before the first step there is no momentum; after undone() there are zero buffers, and the next
    # update must equal SGD's first update (buffer = gradient).
    warmed, warmed_sgd = net_and_sgd()
    fresh, fresh_sgd = net_and_sgd()
    use_lr_tensors(warmed_sgd, CPU)
    use_lr_tensors(fresh_sgd, CPU)
    with undone(warmed, warmed_sgd):
        EagerStep(step_function(warmed, warmed_sgd, "fp32"), warmed)(*batch(7))
    assert all(warmed_sgd.state[p]["momentum_buffer"].abs().sum() == 0 for p in warmed.parameters())
    for _ in range(2):
        for model, optimizer in ((warmed, warmed_sgd), (fresh, fresh_sgd)):
            EagerStep(step_function(model, optimizer, "fp32"), model)(*batch(8))
    for (name, p), q in zip(warmed.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(p, q, **CLOSE, msg=name)


def test_skip_nonfinite_leaves_the_weights_alone():
    model, optimizer = net_and_sgd()
    step = make_step(model, optimizer, (16, 3, 32, 32), precision="fp32", cuda_graph=True, skip_nonfinite=True)
    before = weights(model)
    x, y = batch(9)
    stats = step(x * float("nan"), y)
    assert not torch.isfinite(stats[0])
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # BN statistics did see the batch


def test_bf16_autocast_trains_on_the_cpu_too():
    model, optimizer = net_and_sgd(dtype=torch.float32)  # the weights' dtype of a real run
    step = make_step(model, optimizer, (16, 3, 32, 32), precision="bf16", cuda_graph=False)
    x, y = batch(10, dtype=torch.float32)
    first = step(x, y)[0].item()
    for _ in range(5):
        last = step(x, y)[0].item()
    assert last < first  # it learns the batch
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32


def test_precision_choices():
    assert pick_precision("auto", CPU) == "fp32"
    assert pick_precision("auto", torch.device("cuda")) == "bf16"
    assert pick_precision("bf16", CPU) == "bf16"
    with pytest.raises(ResexpError, match="precision='fp16' is not an option; choose auto, fp32, bf16"):
        pick_precision("fp16", CPU)


# --- What the CUDA-only code decides, shown on the CPU (issue 31)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_graphs_inputs_take_the_parameters_float_type_and_layout(dtype):
    """A float64 net (the tests' reference computations) captured with float32 inputs failed at its first
    convolution: the inputs follow the parameters."""
    from resexp.step import graph_inputs

    model, _ = net_and_sgd(dtype=dtype)
    x, y = graph_inputs(model, (4, 3, 32, 32), (4,))
    assert x.dtype == dtype and y.dtype == torch.int64 and x.is_contiguous(memory_format=torch.channels_last)
    model(x)  # the step's first op takes them


def test_a_failed_capture_of_the_ddp_step_is_named_agreed_by_the_ranks_and_any_other_error_raised(monkeypatch, caplog):
    from resexp import distributed, step

    def refused():
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore lines")

    asked = []
    monkeypatch.setattr(distributed, "any_rank", lambda flag, device: asked.append(flag) or flag)
    assert step.captured_on_every_rank(refused, CPU) is None
    assert "could not be captured (CUDA error: operation not permitted when stream is capturing)" in caplog.text
    sentinel = object()
    assert step.captured_on_every_rank(lambda: sentinel, CPU) is sentinel
    assert asked == [True, False]  # every rank says how its capture went, whether it failed or not
    # Another rank's capture failed: this one falls back with it, though its own capture went well.
    monkeypatch.setattr(distributed, "any_rank", lambda flag, device: True)
    assert step.captured_on_every_rank(lambda: sentinel, CPU) is None and "on another rank" in caplog.text

    def bug():
        raise ValueError("a bug in the step, not the capture")

    with pytest.raises(ValueError, match="a bug in the step"):
        step.captured_on_every_rank(bug, CPU)


def test_undone_steps_leave_torchs_generator_where_it_was():
    """Warm-up steps of a net with dropout draw masks from torch's generator: undone, they leave it as they
    found it, so a run's masks do not shift by its warm-up (nor a resumed run's by its own)."""
    torch.manual_seed(0)
    model = build_model(8, True, "basic", "cifar", "identity", 10, dropout=0.3).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before, state = weights(model), torch.get_rng_state()
    step = EagerStep(step_function(model, optimizer, "fp32"), model)
    with undone(model, optimizer):
        for seed in range(3):
            step(*batch(seed))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_nccl_is_made_graph_safe_even_where_torchrun_set_otherwise():
    from resexp.distributed import graph_safe_nccl

    environ = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}  # what torchrun gives each process it starts
    graph_safe_nccl(environ)
    assert environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"


def test_fp32_means_fp32_and_bf16_keeps_tensorfloat32():
    from resexp.step import choose_algorithms

    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        choose_algorithms(False, "fp32")
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        choose_algorithms(False, "bf16")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
