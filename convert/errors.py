"""User-facing errors: one clear line, non-zero exit, never a traceback."""


class MLAError(Exception):
    """An error caused by the user's input or environment (bad path, bad rank, ...).

    The CLI prints ``error: <message>`` on one line and exits with status 2.
    """
