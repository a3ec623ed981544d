"""User-facing errors: a bad input ends with one line and exit code 2, never a traceback."""


class UserError(Exception):
    """A mistake in what the user handed us (file, flag, data). Message = one line: what, where, what to do."""

    exit_code = 2


class CheckFailed(Exception):
    """`parity check` found a regression (exit 1)."""

    exit_code = 1
