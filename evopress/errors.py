"""User-facing errors.

Anything a user can cause (a wrong path, an unknown source, an infeasible budget) raises `UserError` with one
line that names the bad value and what is allowed. The CLI prints that line and exits 2, without a traceback;
every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


def require(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds."""
    if not condition:
        raise UserError(message)
