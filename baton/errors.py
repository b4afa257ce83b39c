"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""


class BatonError(RuntimeError):
    """A problem the user can fix: the message names the file/key and what to do."""
