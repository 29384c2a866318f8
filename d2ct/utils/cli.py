"""Shared pieces of the command-line tools (each tool's ``main`` lives in its stage's module)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator

# exit statuses besides 0 (argparse itself exits 2 on a usage error)
EXIT_ERROR = 2  # bad input, option or weights: a d2ct error (D2CTError)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away


def prog() -> str | None:
    """argparse's ``prog``: ``python -m d2ct.x.y`` when the tool runs that way (argparse would show
    the module's file name, e.g. ``cli.py``), else ``None``: argparse's default, the name typed
    (``d2ct-train``, ``train_net.py``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None)
    if name and name.startswith("d2ct."):
        return f"python -m {name}"
    return None


INTERRUPTED_MESSAGE = ("interrupted: no partial file was written (outputs are replaced only when complete; "
                       "files finished before the interruption are kept)")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM (``kill``, a batch system's time limit) raises
    KeyboardInterrupt as Ctrl-C does, so the same clean-up runs (temporary files removed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def init_pool_worker(init: Callable[..., Any] | None = None, initargs: tuple = ()) -> None:
    """Initializer for a ``multiprocessing.Pool`` started inside a command: a forked worker inherits
    :func:`sigterm_as_interrupt`'s handler, so the SIGTERM of ``Pool.terminate()`` (every ``with
    Pool(...)`` block ends with it) would raise KeyboardInterrupt in each idle worker and print its
    traceback. Workers die on SIGTERM as usual and ignore Ctrl-C (the parent gets it, stops and
    terminates them); then ``init(*initargs)``, the pool's own initializer, if any."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if init is not None:
        init(*initargs)


def run_cli(body: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run a command's ``body(*args, **kwargs)`` and return its exit status: the int it returns
    (``None`` or anything else: 0), or

    - a d2ct error (:class:`d2ct.errors.D2CTError`: bad input, option or weights): ``error: <message>``
      on stderr, no traceback, status 2;
    - Ctrl-C (KeyboardInterrupt) or SIGTERM (handled as Ctrl-C): one line on stderr, status 130.
      Every output goes through an atomic write, so what an interrupted run leaves is the previous
      complete files or new complete ones, never a partial file; the line says so;
    - a closed pipe on stdout (``d2ct-evaluate ... | head``): nothing more is written, status 141.

    Any other exception propagates with its traceback: it is a bug, not bad input."""
    from d2ct.errors import D2CTError

    try:
        with sigterm_as_interrupt():
            status = body(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
    except D2CTError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python flushes stdout again at exit and would report the closed pipe then: point it at
        # /dev/null first (the recipe of the Python docs, signal module, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
