"""The one exception type that means "the user can fix this".

Anything raised as `UsageError` is shown as a single line and exits with status 2;
anything else is a bug in slmops and keeps its traceback.
"""


class UsageError(Exception):
    """Bad input: the message names the problem and the fix."""
