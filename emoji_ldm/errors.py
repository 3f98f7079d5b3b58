"""User-facing errors.

`UserError` is raised at the boundary for bad input (a value the user gave that
we cannot use). The CLI prints its message as one line and exits with code 2;
every message names the bad value and says what to do.
"""


class UserError(ValueError):
    """Bad input from the user: the message names the value and the fix."""
