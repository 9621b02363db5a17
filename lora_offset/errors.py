"""The one exception type that reaches the user as a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input the user can fix. The message names the file or key and what to do.

    The CLI prints it as `error: <message>` and exits with status 2.
    """
