"""The one exception type that means "the user can fix this".

Anything raised as `UsageError` is shown as a single line and exits with status 2;
anything else is a bug in slmops and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input: the message names the problem and the fix."""


def first_line(err: BaseException) -> str:
    """The headline of a library's error, for quoting inside our one-line messages."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
