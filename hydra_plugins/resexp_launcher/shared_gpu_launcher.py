"""A Hydra launcher that trains the runs of a sweep at the same time, in one process, on one GPU.

At batch 128 one CIFAR net leaves most of an H100 idle even as a CUDA graph: its kernels are small.
Separate processes do not help, since the GPU time-slices between them and their kernels never
overlap. Runs that share one process, each launching from its own thread onto its own CUDA stream,
do overlap. So this launcher runs the task of every run of a batch through Hydra's run_job, one after
another in the main thread (its directory, saved config and log file; the task's preparation: data,
model, checkpoint), with resexp's jobs.collected() open, so that each task hands its prepared run over
instead of training it; then it trains the batch's runs at once (resexp.jobs.train: the CUDA graph
captures one after another, then a thread per run).

    resexp train -m model=plain20,plain56,resnet20,resnet56     # conf/hydra/launcher/shared_gpu.yaml
    resexp train -m ... hydra/launcher=basic                     # Hydra's: one run after another

Each run is the same computation as alone (its own seed, data stream and checkpoints), so an
interrupted sweep resumes, finished runs are skipped, and `resexp report` reads it as any other.
With `hydra.launcher.group_runs=true`, runs of the same layers train as one network of grouped copies
(resexp/group.py). Errors and stops are raised, as the task raised them; resexp's entry point decides
what they mean for the process.

This module is imported whenever any Hydra app starts (Hydra scans every installed plugin), so it
imports torch and resexp only once a sweep is launched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

Prepared = tuple[JobReturn, Any, list[logging.Handler]]  # Hydra's record of the run, resexp's Job, its log file


def label_with_thread(record: logging.LogRecord) -> bool:
    """Log lines from a run's thread (named by the run: resexp.jobs.train) say which run they are about."""
    if record.threadName != "MainThread":
        record.msg = f"{record.threadName}: {record.msg}"
    return True


class SharedGPULauncher(Launcher):
    def __init__(self, max_runs: int, group_runs: bool = False) -> None:
        # max_runs: networks trained at once (a group of group_runs is one); more wait for the next batch.
        # group_runs: runs of the same layers (seeds, plain/residual twins) train as one grouped network.
        self.max_runs, self.group_runs = max_runs, group_runs

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from resexp import distributed, jobs  # torch and the app: only now that a sweep starts
        from resexp.checks import positive_int

        positive_int("hydra.launcher.max_runs", self.max_runs)
        what = (
            "hydra.launcher.group_runs=true"
            if self.group_runs
            else "the shared_gpu launcher (resexp train -m's default)"
        )
        distributed.refuse(
            what, "add hydra/launcher=basic to train the sweep's runs one after another, each over every process"
        )
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        pending = list(enumerate(job_overrides, start=initial_job_idx))
        returns: list[JobReturn] = []
        waiting: list[Prepared] = []  # prepared for a batch that was full: the first of the next one
        while pending or waiting:
            # A batch takes runs in sweep order while they make at most max_runs trainings (a group is
            # one), so a sweep of five seeds per net does not split a net's seeds across batches, and
            # while they may train at once (jobs.can_join: dropout trains alone, and torch's algorithm
            # settings are the process's).
            batch, waiting = waiting, []
            try:
                while pending and not waiting:
                    run = self.prepare(*pending.pop(0))
                    prepared = [job for _, job, _ in batch]
                    if (
                        batch
                        and not jobs.can_join(prepared, run[1])
                        or jobs.networks_to_train([*prepared, run[1]], self.group_runs) > self.max_runs
                    ):
                        waiting = [run]
                    else:
                        batch.append(run)
            except BaseException:  # bad input in one run (which took back its own directory): the batch starts none
                self.take_back(batch)
                raise
            if len(batch) == 1 and (pending or waiting) and jobs.draws_at_random(batch[0][1]):
                logging.getLogger(__name__).info(
                    "%s trains alone: its dropout draws from torch's global generator, which runs beside it would share",
                    batch[0][1].label,
                )
            try:
                returns += self.train(batch)
            except BaseException:  # stopped, or failed: the run prepared for the next batch never starts
                self.take_back(waiting)
                raise
        return returns

    def prepare(self, index: int, overrides: Sequence[str]) -> Prepared:
        """Hydra's run_job sets the run up as for any job (directory, saved config, logging) and runs the
        task, which hands its prepared run to the batch. The log file that run_job opened is kept for the
        run's thread alone."""
        from resexp import jobs

        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id, config.hydra.job.num = str(index), index  # as Hydra's basic launcher
        with jobs.collected() as handed:
            returned = run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        returned.return_value  # noqa: B018 -- raises what the task raised (a bug; bad input passed run_job by)
        if len(handed) != 1:
            raise RuntimeError("the shared_gpu launcher trains resexp's runs; use hydra/launcher=basic for other tasks")
        label = handed[0].label = handed[0].settings.place.run_dir.name  # what the sweep varies: resnet56-A_seed3
        files = [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.FileHandler)]
        for handler in files:  # the next run_job would replace it; train() puts it back
            logging.getLogger().removeHandler(handler)
            handler.addFilter(lambda record, label=label: record.threadName == label)
        return returned, handed[0], files

    def train(self, batch: list[Prepared]) -> list[JobReturn]:
        """The batch's runs at once (resexp.jobs.train), each run's log lines to its own log file."""
        from resexp import jobs

        root, app = logging.getLogger(), logging.getLogger("resexp")
        for _, _, files in batch:
            for handler in files:
                root.addHandler(handler)
        app.addFilter(label_with_thread)
        try:
            test_errors = jobs.train([job for _, job, _ in batch], self.group_runs)
        finally:
            app.removeFilter(label_with_thread)
            for _, _, files in batch:
                for handler in files:
                    root.removeHandler(handler)
                    handler.close()
        for (returned, _, _), error in zip(batch, test_errors):  # what the app returns: a sweeper can minimise it
            returned.return_value, returned.status = error, JobStatus.COMPLETED
        return [returned for returned, _, _ in batch]

    def take_back(self, runs: list[Prepared]) -> None:
        """What Hydra made for prepared runs that will not train (directories holding nothing more)."""
        for _, job, files in runs:
            for handler in files:
                handler.close()
            job.settings.place.take_back()
