"""User-facing errors: one clear line, non-zero exit, never a traceback.

``run_command`` is the one wrapper every entry point (``mla``, ``python -m eval.perplexity``) runs its command in: it
maps each way a command can end (an ``MLAError``, Ctrl-C, SIGTERM/SIGHUP, a full disk, an OS error) to one ``error:``
line and the exit status; ``Parser`` does the same for argparse's usage errors.
"""

import argparse
import errno
import signal
import sys

MAX_QUOTE = 80  # characters of a user's value that an error message quotes


class MLAError(Exception):
    """An error caused by the user's input or environment (bad path, bad rank, ...).

    The CLI prints ``error: <message>`` on one line and exits with status 2.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program runs so that every cleanup of Ctrl-C runs for it too.

    The CLI exits with 128 + the signal's number (143 for SIGTERM, 129 for SIGHUP), as a shell reports a killed job.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def quote(value, limit: int = MAX_QUOTE) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error line never repeats a huge input (a YAML bomb, a file)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Parser(argparse.ArgumentParser):
    """argparse with one ``error:`` line (naming ``--help``) instead of a usage block, exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


MAX_ERROR = 500  # characters of an error line; longer messages are cut


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _on_signals(handler) -> dict:
    """Install ``handler`` for SIGTERM and SIGHUP (main thread only); return the handlers it replaced."""
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: leave the signals alone
            pass
    return previous


def _disk_full(err: BaseException) -> bool:
    """An out-of-space error, whether ``OSError`` or a library's own (safetensors' ``SafetensorError``)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def _out_of_memory(err: BaseException) -> bool:
    """An allocator's failure as torch raises it: ``DefaultCPUAllocator: can't allocate memory`` on the CPU, or
    ``torch.OutOfMemoryError`` (CUDA)."""
    return isinstance(err, RuntimeError) and (type(err).__name__ == "OutOfMemoryError"
                                              or "DefaultCPUAllocator: can't allocate memory" in str(err))


def run_command(func, *args) -> int:
    """``func(*args)`` with every ending mapped to one ``error:`` line and its exit status; SIGTERM and SIGHUP raise
    ``Terminated`` meanwhile, so the cleanups of Ctrl-C (temporary folders, locks, child processes) run for them."""
    previous = _on_signals(_raise_terminated)
    try:
        return _guarded(func, *args)
    finally:
        sys.stdout.flush()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _guarded(func, *args) -> int:
    try:
        return func(*args)
    except MLAError as err:
        return _fail(str(err), 2)
    except Terminated as err:
        return _fail(f"terminated by {signal.Signals(err.signum).name} (OUT was not written)", 128 + err.signum)
    except KeyboardInterrupt:
        return _fail("interrupted (OUT was not written)", 130)
    except MemoryError:
        return _fail("out of memory", 2)
    except Exception as err:
        if _out_of_memory(err):  # the first line says how much was asked for
            return _fail(f"out of memory: {(str(err).splitlines() or [''])[0]}", 2)
        if _disk_full(err):
            return _fail("no space left on the device: free some space and run again (OUT was not written)", 2)
        if isinstance(err, OSError):
            where = f": {err.filename}" if err.filename else ""
            return _fail(f"{err.strerror or err}{where}", 2)
        raise


def _fail(message: str, code: int) -> int:
    line = " ".join(message.split())
    print(f"error: {line if len(line) <= MAX_ERROR else line[:MAX_ERROR - 3] + '...'}", file=sys.stderr)
    return code
