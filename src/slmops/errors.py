"""Exceptions the user can act on, kept free of heavy imports so every command can catch them.

Anything raised as `UsageError` is shown as a single line and exits with status 2; `Interrupted`
says where the checkpoint to resume from is; `ParityError` (exit status 1) says an export ran but does not
answer like its PyTorch model; anything else is a bug in slmops and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input: the message names the problem and the fix."""


def first_line(err: BaseException) -> str:
    """The headline of a library's error, for quoting inside our one-line messages."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint (`checkpoint`)."""

    def __init__(self, message: str, checkpoint: str | None):
        super().__init__(message)
        self.checkpoint = checkpoint


class ParityError(Exception):
    """The export ran but does not answer like the PyTorch model; the folder is kept as OUT.failed."""
