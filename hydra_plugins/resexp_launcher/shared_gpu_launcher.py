"""A Hydra launcher that trains the runs of a sweep at the same time, in one process, on one GPU.

At batch 128 one CIFAR net leaves most of an H100 idle even as a CUDA graph: its kernels are small.
Separate processes do not help, since the GPU time-slices between them and their kernels never
overlap. Runs that share one process, each launching from its own thread onto its own CUDA stream,
do overlap. So this launcher prepares every run of the sweep, one after another in the main thread
(Hydra's run_job: its directory, saved config and log file; resexp's prepare: data, model, checkpoint,
and the CUDA graph capture, which must not meet other GPU work), then trains them all at once, each
in a thread named by what sets it apart.

    resexp train -m model=plain20,plain56,resnet20,resnet56     # conf/hydra/launcher/shared_gpu.yaml
    resexp train -m ... hydra/launcher=basic                     # Hydra's: one run after another

Each run is the same computation as alone (its own seed, data stream and checkpoints), so an
interrupted sweep resumes, finished runs are skipped, and `resexp report` reads it as any other.

With `hydra.launcher.group_runs=true`, runs of the same layers train as one network of K grouped
copies, one step for all (resexp/group.py), still each in its own thread and directory: runs that
differ only in their seed (`seed=0,1,2,3,4`), and plain nets with their residual twins where the
shortcuts are option A's (Fig. 6: plain20 with resnet20). The groups and the other runs overlap on
their streams as above.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from resexp.cli import Job, discard_sweep, drop_unstarted, fail, prepare_task, stopped
from resexp.errors import Interrupted, ResexpError
from resexp.group import Lockstep, make_group_step
from resexp.logs import Display, displays, log
from resexp.step import Step
from resexp.train import stop_requests

Prepared = tuple[JobReturn, Job, list[logging.Handler]]  # Hydra's record of the job, the run, its log file


def label_with_thread(record: logging.LogRecord) -> bool:
    """Log lines from a run's thread say which run they are about."""
    if record.threadName != "MainThread":
        record.msg = f"{record.threadName}: {record.msg}"
    return True


def labels(batch: Sequence[Sequence[str]]) -> list[str]:
    """Name each run by what differs between the runs (`model=plain20`), for log lines and progress bars."""
    varying = [[item for item in overrides if any(item not in other for other in batch)] for overrides in batch]
    names = [",".join(items) or "run" for items in varying]
    return [f"{name}#{index}" if names.count(name) > 1 else name for index, name in enumerate(names)]


class SharedGPULauncher(Launcher):
    def __init__(self, max_runs: int, group_runs: bool = False) -> None:
        self.max_runs = (
            max_runs  # runs (with group_runs: groups of runs) that train at once; more wait for the next batch
        )
        self.group_runs = (
            group_runs  # runs of the same layers (seeds, plain/residual twins) train as one grouped network
        )

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if not isinstance(self.max_runs, int) or self.max_runs < 1:
            discard_sweep(self.config.hydra)
            raise ResexpError(f"hydra.launcher.max_runs={self.max_runs!r} must be a positive integer")
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        returns: list[JobReturn] = []
        pending = list(enumerate(zip(job_overrides, labels(job_overrides)), initial_job_idx))
        waiting: list[Prepared] = []  # prepared for a batch that was full: the first of the next one
        while pending or waiting:
            # A batch takes runs in sweep order while they make at most max_runs trainings (a group is
            # one), so a sweep of five seeds per net does not split a net's seeds across batches.
            prepared, waiting = waiting, []
            try:
                while pending and not waiting:
                    index, (overrides, label) = pending.pop(0)
                    run = self.prepare(index, overrides, label)
                    jobs = [job for _, job, _ in prepared] + [run[1]]
                    training = [
                        members for members in trainings(jobs, self.group_runs) if jobs[members[0]].model is not None
                    ]
                    if len(training) > self.max_runs:
                        waiting = [run]
                    else:
                        prepared.append(run)
            except BaseException:  # bad input in one run (prepare_task said which): the batch starts none
                self.take_back(prepared)
                raise
            try:
                returns += train_together(prepared, self.config.hydra, self.group_runs)
            except BaseException:  # stopped, or failed: the run prepared for the next batch never starts
                self.take_back(waiting)
                raise
        return returns

    def take_back(self, runs: list[Prepared]) -> None:
        """What Hydra made for prepared runs that will not train (directories holding nothing more)."""
        for returned, _, files in runs:
            for handler in files:
                handler.close()
            drop_unstarted(returned.hydra_cfg.hydra)
        discard_sweep(self.config.hydra)  # if no run is left in it

    def prepare(self, index: int, overrides: Sequence[str], label: str) -> Prepared:
        """Hydra's run_job sets the run up as for any job (directory, saved config, logging); the task
        only builds it. The log file that run_job opened is kept for the run's thread alone."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = config.hydra.job.num = index
        returned = run_job(
            hydra_context=self.hydra_context,
            task_function=prepare_task,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        job = dataclasses.replace(returned.return_value, label=label)  # raises what a bug in preparing raised
        files = [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.FileHandler)]
        for handler in files:  # the next run_job would replace it; train_together puts it back
            logging.getLogger().removeHandler(handler)
            handler.addFilter(lambda record, label=job.label: record.threadName == label)
        return returned, job, files


class Seat(NamedTuple):  # not a dataclass: Hydra's plugin scan imports this file outside sys.modules
    """How one run of a batch trains: its step, the stop requests it reads, what to do when its training
    ends, however it ends, and its CUDA stream (None off CUDA)."""

    step: Step | None
    stops: list[int]
    leave: Callable[[], None] = lambda: None
    stream: torch.cuda.Stream | None = None


def new_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A CUDA stream for a run (or a group), after the work that built it on the default stream."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def on(stream: torch.cuda.Stream | None) -> ContextManager:
    return nullcontext() if stream is None else torch.cuda.stream(stream)


def group_seats(group: list[Job], signals: list[int]) -> list[Seat]:
    """Runs of one kin (the same layers: seeds, plain/residual twins) trained as one grouped network: each run's
    step hands its batch to the group's (resexp/group.py), and all read their stops from it."""
    optimizers = [job.optimizer for job in group]
    step = make_group_step([job.model for job in group], optimizers, **group[0].step_options)
    lockstep = Lockstep(step, optimizers, signals)
    log.info("%s train as one network (hydra.launcher.group_runs)", ", ".join(job.label for job in group))
    return [
        Seat(functools.partial(lockstep.step, k), lockstep.stops, functools.partial(lockstep.leave, k))
        for k in range(len(group))
    ]


def trainings(jobs: list[Job], group_runs: bool) -> list[list[int]]:
    """Which runs (their indices in `jobs`) train as one: with `group_runs` the runs of each kin, and
    every other run (finished ones too) alone."""
    together: dict[str, list[int]] = {}
    for index, job in enumerate(jobs):
        together.setdefault(job.kin if group_runs and job.model is not None else f"#{index}", []).append(index)
    return list(together.values())


def seats(jobs: list[Job], group_runs: bool, signals: list[int]) -> list[Seat]:
    """Each run's step, built here one after another in the main thread (a CUDA graph capture must not
    meet other GPU work): alone, or with `group_runs` one step for each set of runs of the same kin.
    A group's runs share one stream, which keeps the order in which their threads hand in work."""
    groups = trainings(jobs, group_runs)
    grouped_on = {jobs[members[0]].device for members in groups if len(members) > 1}
    if off_gpu := sorted(str(device) for device in grouped_on if device.type != "cuda"):
        # grouped convolutions are slow CPU kernels: measured 1.8x slower per run
        log.warning(
            "on %s a group trains slower than its runs apart; group_runs is meant for a GPU", ", ".join(off_gpu)
        )
    seated: dict[int, Seat] = {}
    for members in groups:
        if len(members) == 1:
            seated[members[0]] = Seat(jobs[members[0]].make_step(), signals)
        else:
            seated.update(zip(members, group_seats([jobs[index] for index in members], signals)))
    for members in groups:  # after every capture, which the streams must follow
        stream = new_stream(jobs[members[0]].device)
        seated.update({index: seated[index]._replace(stream=stream) for index in members})
    return [seated[index] for index in range(len(jobs))]


def train_together(prepared: list[Prepared], hydra_cfg: DictConfig, group_runs: bool = False) -> list[JobReturn]:
    """Train the prepared runs at once, each in a thread on a CUDA stream of its own (or its group's);
    report as one."""
    root = logging.getLogger()
    outcomes: dict[str, BaseException | float] = {}

    def work(job: Job, screen: Display, seat: Seat) -> None:
        try:
            with on(seat.stream):
                outcomes[job.label] = job.train(screen, seat.stops, seat.step)
        except BaseException as error:  # reported below, in the main thread, once every run has stopped
            outcomes[job.label] = error
        finally:
            seat.leave()

    for _, _, files in prepared:
        for handler in files:
            root.addHandler(handler)
    log.addFilter(label_with_thread)
    try:
        with displays({job.label: job.iterations for _, job, _ in prepared}) as screens, stop_requests() as stops:
            jobs = [job for _, job, _ in prepared]
            threads = [
                threading.Thread(target=work, args=(job, screen, seat), name=job.label, daemon=True)
                for job, screen, seat in zip(jobs, screens, seats(jobs, group_runs, stops))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    except KeyboardInterrupt:  # a second Ctrl-C: the threads die with the process, checkpoints stay whole
        fail(f"stopped at once; the last checkpoints in {hydra_cfg.sweep.dir} are intact", 128 + signal.SIGINT)
    finally:
        log.removeFilter(label_with_thread)
        for _, _, files in prepared:
            for handler in files:
                root.removeHandler(handler)
                handler.close()

    errors = [
        (job.label, outcomes[job.label]) for _, job, _ in prepared if isinstance(outcomes[job.label], BaseException)
    ]
    for _, error in errors:
        if not isinstance(error, (ResexpError, Interrupted)):
            raise error  # a bug: its whole traceback
    if stops := [error for _, error in errors if isinstance(error, Interrupted)]:
        for label, error in errors:
            if isinstance(error, ResexpError):  # a run that had failed before the stop: say so too
                log.error("%s: %s", label, error)
        stopped(stops[0].signum, stops[0].iteration, hydra_cfg)
    if errors:
        fail("error: " + "; ".join(f"{label}: {error}" for label, error in errors))
    for returned, job, _ in prepared:
        returned.return_value, returned.status = outcomes[job.label], JobStatus.COMPLETED
    return [returned for returned, _, _ in prepared]
