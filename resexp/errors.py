"""What ends a run early: bad input (ResexpError, one line for the user) or a stop request (Interrupted)."""


class ResexpError(Exception):
    """Bad input or a missing/corrupt resource: the message names the bad value and the valid ones."""


class LostProcess(ResexpError):
    """Another process of the run (torchrun's, SLURM's) ended or was lost while this one trained: no input
    was bad, so its exit code is 1, not 2; the last checkpoint stands."""


class Interrupted(BaseException):
    """SIGTERM (preemption) or SIGINT (Ctrl-C) stopped the command. During training (`training`) every
    run saved a checkpoint at the iteration it reached, `iteration` (None: stopped at once by a second
    signal; the last checkpoint of each run stands). Outside it (`training=False`: while a run was being
    prepared, or between runs) what a run being prepared had made is taken back. `resume` says how to
    continue. A BaseException, as KeyboardInterrupt is: a stop is not an error, so nothing that handles
    errors (Hydra's run_job among them) takes it for one, and it ends the process wherever it is raised."""

    def __init__(self, signum: int, iteration: int | None = None, resume: str = "", training: bool = True) -> None:
        super().__init__(f"signal {signum} at iteration {iteration}")
        self.signum, self.iteration, self.resume, self.training = signum, iteration, resume, training


class JobFailed(BaseException):
    """A run's ResexpError on its way out of Hydra's run_job, which would record an Exception as a failed
    job, print a report of its own to stderr and go on to the next run of a sweep. As a BaseException it
    passes Hydra by, ends the command at once, as bad input should, and reaches the entry point whole."""

    def __init__(self, error: ResexpError) -> None:
        super().__init__(str(error))
        self.error = error


def first_line(error: BaseException) -> str:
    """What an error says, in one line: its message's first line, or its type where it says nothing."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
