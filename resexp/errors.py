"""The one error type a user sees as a single line instead of a traceback."""


class ResexpError(Exception):
    """Bad input or a missing/corrupt resource: the message names the bad value and the valid ones."""
