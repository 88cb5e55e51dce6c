"""The one base class of user-facing errors: the CLI prints their message as one line, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad input, unreachable or misconfigured service): one-line message."""
