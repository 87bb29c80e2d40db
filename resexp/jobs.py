"""A run's lifecycle, between the entry point (cli.py, which makes RunSettings with config.py) and the
training loop (train.py):

    RunSettings -> prepare() -> Job -> start() -> train([job, ...]) -> final test errors

`prepare` builds a run from its settings and decides what its directory holds already: nothing (a new
run), a checkpoint of the same run (resumed), metrics.json (finished: skipped), anything else (refused).
Bad input met on the way takes back what Hydra made for the run (`taken_back`). `train` trains prepared
runs, one or many at once (a single run is a batch of one; several train each in a thread of its own),
and maps however each ended to one outcome: their final test errors; Interrupted for a stop request,
every run having saved its checkpoint; a ResexpError naming each run that failed; or a bug's own
exception. `start`, a Hydra task's last step, trains its run at once, or hands it to the batch the
shared-GPU launcher is collecting (hydra_plugins/resexp_launcher/), which then trains the batch's runs
together.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import resexp
from resexp import checkpoint, distributed, runs
from resexp.data import Data, Shard
from resexp.errors import Interrupted, LostProcess, ResexpError, first_line
from resexp.group import Lockstep, make_group_step
from resexp.launch import lost_peer
from resexp.logs import Board, Display, displays, log
from resexp.models import Spec, check_size, count_parameters
from resexp.runs import Metrics, Place
from resexp.step import Step, choose_algorithms, make_step, new_stream, on_stream, restore_rng_states, rng_states
from resexp.tags import TEST_ERROR, TRAIN_ERROR
from resexp.train import Loop, Remedies, restore, stop_requests
from resexp.train import train as train_loop


@dataclass(frozen=True)
class RunSettings:
    """Everything a run is built from, as plain typed values (config.py makes them from the config)."""

    place: Place  # where it writes, and what Hydra made there for it
    net: Spec
    data: Callable[..., Data]  # the data config's builder: (batch_size=, seed=, device=, shard=) -> Data
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]  # the optim config's, given the parameters
    loop: Loop  # the schedule and the loop's intervals
    batch_size: int  # the global batch: of which each process trains its share under torchrun
    seed: int  # weight initialisation, data order and augmentation
    device: torch.device
    cuda_graph: bool  # capture the step as a CUDA graph (on CUDA)
    compile: bool  # torch.compile the net inside the step
    deterministic: bool  # torch's deterministic algorithms, no cuDNN autotuning: one seed, one result on a GPU too
    resume: bool  # continue a run its directory holds; False: refuse such a directory
    sync_bn: bool  # under several processes, BN statistics over the global batch
    identity: dict[str, Any]  # what its checkpoint must match to be continued: the config less where and how it runs
    model_config: str | None  # the model and data configs' names (resnet56, cifar10), for metrics.json
    data_config: str | None
    resume_command: str  # what continues it after a stop
    remedies: Remedies  # what a stop for non-finite weights or loss advises
    varies: dict[str, Any] = field(default_factory=dict)  # what else tells it apart from other runs, and how
    notes: tuple[str, ...] = ()  # what the user set that this run does not use, said once as it starts


@dataclass
class Job:
    """A run built from its settings, up to its first step; or a run that finished already."""

    settings: RunSettings
    label: str  # how log lines, threads and progress bars name it: the net, or in a sweep what sets it apart
    finished: Metrics | None = None  # its metrics.json, when it has finished: nothing left to train
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    data: Data | None = None
    resumed: dict[str, Any] | None = None  # the checkpoint it continues
    params: int = 0
    group_key: str = ""  # runs with the same key have the same layers and can train as one group (resexp/group.py)
    step_options: dict[str, Any] = field(default_factory=dict)  # make_step's and make_group_step's keywords
    # torch's random states at its first step: after its weights were drawn, or its checkpoint's
    rng: dict[str, Any] = field(default_factory=dict)

    @property
    def iterations(self) -> int:
        return 0 if self.finished is not None else self.settings.loop.schedule.iterations

    @property
    def algorithms(self) -> tuple[bool, str]:
        """What it sets of torch's algorithm settings (step.choose_algorithms), which are the process's."""
        return self.settings.deterministic, self.settings.loop.precision


def held_already(place: Place, resume: bool, identity: dict[str, Any]) -> tuple[Metrics | None, dict | None]:
    """What the run's directory holds: (metrics, None) when the run finished, (None, checkpoint) to continue,
    (None, None) for a new run. Never overwrites: without resume an existing run is refused, and so is a
    checkpoint of another run."""
    saved, done = place.run_dir / runs.CHECKPOINT, place.run_dir / runs.METRICS
    if not saved.exists() and not done.exists():
        return None, None
    another = "hydra.sweep.dir" if place.in_sweep else "hydra.run.dir"
    if not resume:
        raise ResexpError(
            f"{place.run_dir} already holds a run; resume=true continues it, another {another} starts a new one"
        )
    state = checkpoint.load(saved) if saved.exists() else None
    if state is not None:
        checkpoint.check_same_run(saved, state["identity"], identity, another)
    return (runs.read_metrics(place.run_dir), None) if done.exists() else (None, state)


def prepare(settings: RunSettings) -> Job:
    """Build what the settings name, up to the first step: data, model, optimizer, and the checkpoint put back."""
    name, net, world = settings.net.name, settings.net, distributed.WORLD
    finished, resumed = held_already(settings.place, settings.resume, settings.identity)
    # every rank resumes the checkpoint that rank 0 does (the run directory is on a shared file system)
    distributed.same_on_every_rank(
        "finished" if finished else resumed and resumed["progress"].get("iteration"), "the run directory's state"
    )
    if finished is not None:
        log.info("%s finished already (%s): nothing to do", name, settings.place.run_dir / runs.METRICS)
        return Job(settings, name, finished=finished)
    check_size(net, settings.device)
    torch.manual_seed(settings.seed)  # weight initialisation; the data stream has a generator of its own
    model = net.build().to(settings.device, memory_format=torch.channels_last)  # the layout of the images
    if settings.sync_bn and world.size > 1:
        model = distributed.sync_batch_norm(model, settings.device)
    for note in settings.notes:
        log.info("%s", note)
    shard = Shard(world.rank, world.size)  # this process's share of every batch
    data = settings.data(batch_size=settings.batch_size, seed=settings.seed, device=settings.device, shard=shard)
    optimizer = settings.optimizer(model.parameters())
    if resumed is not None:
        try:
            restore(model, optimizer, data, resumed)
        except ValueError as error:
            path = settings.place.run_dir / runs.CHECKPOINT
            raise ResexpError(f"{path} is damaged: {error}; {checkpoint.START_OVER}") from None
    loop = settings.loop
    step_options = dict(
        batch_shape=(settings.batch_size // world.size, *data.image_shape),
        precision=loop.precision,
        cuda_graph=settings.cuda_graph,
        compile_model=settings.compile,
        skip_nonfinite=loop.on_nonfinite == "skip",
        **({"prepare": data.transform, "batch_dtype": data.batch_dtype} if data.transform is not None else {}),
    )
    # Runs alike in all but the seed, on one device and at one iteration, can train as one group; so can
    # plain and residual twins with option A's shortcuts, which have no weights (resexp/group.py).
    may_differ = {"seed", "model.residual"} if net.shortcut == "identity" else {"seed"}
    same = {key: value for key, value in settings.identity.items() if key not in may_differ}
    done = resumed["progress"]["iteration"] if resumed is not None else 0
    group_key = json.dumps([same, str(settings.device), step_options, done], default=str)
    if data.transform is not None:  # its batches are made the net's input in its own step (packed ImageNet)
        group_key = f"alone: {settings.place.run_dir}"
    params = count_parameters(model)
    on = (
        str(settings.device)
        if world.size == 1
        else f"{world.size} processes ({settings.device.type}, {world.launcher})"
    )
    log.info(
        "%s: %s parameters, %d iterations at batch %d on %s (%s) -> %s",
        name,
        f"{params:,}",
        loop.schedule.iterations,
        settings.batch_size,
        on,
        loop.precision,
        settings.place.run_dir,
    )
    return Job(
        settings,
        name,
        model=model,
        optimizer=optimizer,
        data=data,
        resumed=resumed,
        params=params,
        group_key=group_key,
        step_options=step_options,
        rng=rng_states(),
    )


def description(job: Job) -> dict[str, Any]:
    """What the run is: the first fields of its metrics.json, and its row in TensorBoard's HPARAMS."""
    settings, net = job.settings, job.settings.net
    return {
        "net": net.name,
        "model": settings.model_config,
        "data": settings.data_config,
        "depth": net.depth,
        "residual": net.residual,
        "shortcut": net.shortcut_option,  # None: a plain net, or one of a family without shortcut options
        "params": job.params,
        "iterations": settings.loop.schedule.iterations,
        "batch_size": settings.batch_size,
        "lr": settings.loop.base_lr,
        "seed": settings.seed,
    }


def train_job(job: Job, screen: Display, stops: list[int], step: Step | None) -> float:
    """Train (or resume) the run with `step` and write its metrics.json; its final test error."""
    if job.finished is not None:
        return job.finished.final[TEST_ERROR]
    settings, described = job.settings, description(job)
    run_dir = settings.place.run_dir
    # Right before the first step: since this run was prepared, others may have been (a shared-GPU batch:
    # each reseeds), and a CUDA graph's warm-up steps have drawn dropout masks. A run then draws what it
    # draws alone, and what it would have drawn had it not stopped.
    restore_rng_states(job.rng)
    try:
        summary = train_loop(
            job.model,
            job.optimizer,
            step,
            job.data,
            settings.loop,
            run_dir=run_dir,
            screen=screen,
            stops=stops,
            identity=settings.identity,
            board=Board.of_run(
                settings.net, settings.seed, settings.varies, settings.data_config, settings.loop.schedule.iterations
            ),
            resume=job.resumed,
            remedies=settings.remedies,
        )
    except RuntimeError as error:
        if distributed.WORLD.size == 1 or (reason := lost_peer(error)) is None:
            raise  # a bug
        raise LostProcess(
            f"another process of the run ended or was lost ({reason}); the last checkpoint stands; "
            f"resume: {settings.resume_command}"
        ) from None
    except ResexpError:  # bad data met in training, a full disk: a run with no checkpoint is no run
        if distributed.WORLD.main and not (run_dir / runs.CHECKPOINT).exists():
            settings.place.take_back()
        raise
    device, processes = settings.device, distributed.WORLD.size
    if distributed.WORLD.main:
        runs.write_metrics(
            run_dir,
            Metrics(
                **described,
                precision=settings.loop.precision,
                images_per_s=settings.loop.schedule.iterations * settings.batch_size / summary["train_time_s"],
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                processes=processes,
                torch=torch.__version__,
                python=platform.python_version(),
                resexp=resexp.__version__,
                spec={
                    **settings.net.model_values(),
                    "shortcut": settings.net.shortcut,
                    "num_classes": settings.net.num_classes,
                },
                **summary,
            ),
        )
    final = summary["final"]
    log.info(
        "done: train err %.2f%%  test err %.2f%%  -> %s",
        final[TRAIN_ERROR],
        final[TEST_ERROR],
        run_dir / runs.METRICS,
    )
    return final[TEST_ERROR]


def draws_at_random(job: Job) -> bool:
    """Whether the run's training draws from torch's global generator (a net's dropout): runs
    trained beside it, in threads of one process, would draw from it too, in an order no rerun repeats,
    so such a run trains in a batch of its own (hydra_plugins/resexp_launcher/)."""
    return job.finished is None and any(isinstance(m, nn.Dropout) and m.p > 0 for m in job.model.modules())


def can_join(batch: list[Job], job: Job) -> bool:
    """Whether `job` may train at once with the runs of `batch` (hydra_plugins/resexp_launcher/): where
    none of them draws from torch's global generator (draws_at_random), and all set torch's algorithm
    settings alike (deterministic, fp32's TF32: choose_algorithms), which are the process's."""
    together = [other for other in [*batch, job] if other.finished is None]
    return not any(draws_at_random(other) for other in together) and len({other.algorithms for other in together}) <= 1


def train_as_one(jobs: list[Job], group_runs: bool) -> list[list[int]]:
    """Which runs (their indices in `jobs`) train as one: with `group_runs` the runs of each group key, and
    every other run (finished ones too) alone."""
    together: dict[str, list[int]] = {}
    for index, job in enumerate(jobs):
        key = job.group_key if group_runs and job.finished is None else f"#{index}"
        together.setdefault(key, []).append(index)
    return list(together.values())


def networks_to_train(jobs: list[Job], group_runs: bool) -> int:
    """How many networks `jobs` train: a group is one, a finished run none."""
    return sum(jobs[members[0]].finished is None for members in train_as_one(jobs, group_runs))


@dataclass(frozen=True)
class RunStep:
    """How one run of a batch trains: its step, the stop requests it reads, what to do when its training
    ends, however it ends, and its CUDA stream (None off CUDA, or alone on the GPU)."""

    step: Step | None  # None: the run finished already
    stops: list[int]
    leave: Callable[[], None] = lambda: None
    stream: torch.cuda.Stream | None = None
    group: Lockstep | None = None  # the group it trains in, which runs each group step on the group's stream


def group_steps(group: list[Job], signals: list[int]) -> list[RunStep]:
    """Runs of one group key trained as one grouped network: each run's step hands its batch to the
    group's (resexp/group.py), and all read their stop requests from it."""
    optimizers = [job.optimizer for job in group]
    step = make_group_step([job.model for job in group], optimizers, **group[0].step_options)
    lockstep = Lockstep(step, optimizers, signals)
    log.info("%s train as one network (hydra.launcher.group_runs)", ", ".join(job.label for job in group))
    return [
        RunStep(
            functools.partial(lockstep.step, k), lockstep.stops, functools.partial(lockstep.leave, k), group=lockstep
        )
        for k in range(len(group))
    ]


def run_steps(jobs: list[Job], group_runs: bool, signals: list[int]) -> list[RunStep]:
    """Each run's step, built here one after another in the main thread (a CUDA graph capture must not
    meet other GPU work): alone, or with `group_runs` one step for each set of runs of one group key.
    Beside others each training gets a CUDA stream of its own, which a group's runs share: it keeps the
    order in which their threads hand in work."""
    groups = train_as_one(jobs, group_runs)
    grouped_on = {jobs[members[0]].settings.device for members in groups if len(members) > 1}
    if off_gpu := sorted(str(device) for device in grouped_on if device.type != "cuda"):
        # grouped convolutions are slow CPU kernels: measured 1.8x slower per run
        log.warning(
            "on %s a group trains slower than its runs apart; group_runs is meant for a GPU", ", ".join(off_gpu)
        )
    steps: dict[int, RunStep] = {}
    for members in groups:
        if len(members) > 1:
            steps.update(zip(members, group_steps([jobs[index] for index in members], signals)))
        else:
            job = jobs[members[0]]
            step = None if job.finished is not None else make_step(job.model, job.optimizer, **job.step_options)
            steps[members[0]] = RunStep(step, signals)
    if len(groups) > 1:  # after every capture, which the streams must follow
        for members in groups:
            stream = new_stream(jobs[members[0]].settings.device)
            steps.update({index: dataclasses.replace(steps[index], stream=stream) for index in members})
            if (group := steps[members[0]].group) is not None:
                group.stream = stream
    return [steps[index] for index in range(len(jobs))]


def record_ends(ended: list[tuple[Job, BaseException]]) -> None:
    """Each run's train.log says how it ended early (runs.state reads it back for report, eval, analyze)."""
    if not distributed.WORLD.main:  # rank 0 writes the run's files
        return
    for job, error in ended:
        if isinstance(error, Interrupted):
            name = signal.Signals(error.signum).name
            at = f"at iteration {error.iteration}, checkpoint saved" if error.iteration is not None else "at once"
            runs.record_end(job.settings.place.run_dir, f"stopped by {name} {at}")
        else:
            runs.record_end(job.settings.place.run_dir, f"failed: {first_line(error)}")


def train(jobs: list[Job], group_runs: bool = False) -> list[float]:
    """Train prepared runs at once and return their final test errors: a lone run in this thread, several
    each in a thread of its own (and on a CUDA stream of its own, or its group's). However they end, one
    outcome: a stop request raises Interrupted once every run has checkpointed; runs that failed raise one
    ResexpError naming each; a bug raises itself."""
    directories = [job.settings.place.run_dir for job in jobs]
    if shared := next((path for path in directories if directories.count(path) > 1), None):
        raise ResexpError(
            f"two runs of the sweep would write to {shared}; name them apart, for example with "
            "hydra.sweep.subdir='${hydra.job.override_dirname}'"
        )
    outcomes: list[BaseException | float | None] = [None] * len(jobs)

    def work(index: int, screen: Display, run_step: RunStep) -> None:
        thread = threading.current_thread()
        # The thread of a run is named by it, so that its log records say which run they are about.
        named, thread.name = thread.name, jobs[index].label
        try:
            with on_stream(run_step.stream):
                outcomes[index] = train_job(jobs[index], screen, run_step.stops, run_step.step)
        except BaseException as error:  # reported below, in the main thread, once every run has stopped
            outcomes[index] = error
        finally:
            run_step.leave()
            thread.name = named

    algorithms = {job.algorithms for job in jobs if job.finished is None}
    if len(algorithms) > 1:  # the launcher never makes such a batch (can_join)
        raise ResexpError(
            f"runs trained at once share torch's algorithm settings, and these differ: {sorted(algorithms)}"
        )
    for deterministic, precision in algorithms:
        choose_algorithms(deterministic, precision)
    try:
        with stop_requests() as signals, displays([(job.label, job.iterations) for job in jobs]) as screens:
            each = list(zip(range(len(jobs)), screens, run_steps(jobs, group_runs, signals)))  # work()'s arguments
            if len(jobs) == 1:  # alone, in this thread: CPU kernels ran 10-15% slower in a new thread (OpenMP)
                work(*each[0])
            else:
                threads = [threading.Thread(target=work, args=args, daemon=True) for args in each]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
    except Interrupted as stop:  # a second signal: the threads die with the process, checkpoints stay whole
        record_ends([(job, stop) for job in jobs if job.finished is None])
        raise Interrupted(stop.signum, None, jobs[0].settings.resume_command) from None

    failed = [(job, outcome) for job, outcome in zip(jobs, outcomes) if isinstance(outcome, BaseException)]
    record_ends(failed)
    for _, error in failed:
        if not isinstance(error, (ResexpError, Interrupted)):
            raise error  # a bug: its whole traceback
    if stops := [error for _, error in failed if isinstance(error, Interrupted)]:
        for job, error in failed:
            if isinstance(error, ResexpError):  # a run that had failed before the stop: say so too
                log.error("%s: %s", job.label, error)
        raise Interrupted(stops[0].signum, stops[0].iteration, jobs[0].settings.resume_command)
    if failed and len(jobs) == 1:
        raise failed[0][1]  # as it is: a lone run needs no name
    if failed:
        raise ResexpError("; ".join(f"{job.label}: {error}" for job, error in failed))
    return outcomes


# --- How runs reach `train`: at once, or through the shared-GPU launcher's batch

collecting: list[Job] | None = None  # the batch that `collected` opened, if any


@contextmanager
def collected() -> Iterator[list[Job]]:
    """Runs that `start` meets inside join the list instead of training: how the shared-GPU launcher
    prepares a batch through Hydra's run_job, one run after another, to train them at once."""
    global collecting
    outer, collecting = collecting, []
    try:
        yield collecting
    finally:
        collecting = outer


def start(job: Job) -> float | None:
    """Train the run now, as a batch of one, and return its final test error; or hand it to the batch
    being collected (None: the launcher trains it, and reports its error)."""
    if collecting is not None:
        collecting.append(job)
        return None
    return train([job])[0]


@contextmanager
def taken_back(place: Place) -> Iterator[None]:
    """Bad input, any error, or a stop inside, before the run trained: take back what Hydra made for it."""
    try:
        yield
    except BaseException:
        place.take_back()
        raise
