"""The one error type a user sees as a single line instead of a traceback."""


class ResexpError(Exception):
    """Bad input or a missing/corrupt resource: the message names the bad value and the valid ones."""


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was saved at `iteration`."""

    def __init__(self, signum: int, iteration: int) -> None:
        super().__init__(f"signal {signum} at iteration {iteration}")
        self.signum, self.iteration = signum, iteration
