"""Progress bars that behave in logs: every tqdm bar of the package is made by :func:`progress_bar`.

On a terminal a bar redraws itself in place (tqdm's defaults). When the stream is not a terminal
(output redirected to a file, a pipe, a CI or ``ros2 launch`` log) each redraw would be another
carriage-return line in the log, several per second; there the bar redraws at most every
:data:`LOG_INTERVAL_S` seconds, at a fixed width, in ASCII, so a log gets a handful of progress
lines instead of hundreds.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional

#: seconds between two redraws of a bar whose stream is not a terminal
LOG_INTERVAL_S = 30.0
#: bar width (characters) when the stream is not a terminal
LOG_NCOLS = 100


def stream_is_tty(stream) -> bool:
    """True when ``stream`` (default: ``sys.stderr``) is an interactive terminal; False for files,
    pipes, closed streams and objects without ``isatty``."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress_bar(iterable: Optional[Iterable] = None, **kwargs):
    """A ``tqdm`` bar: tqdm's defaults on a terminal, log-friendly settings otherwise.

    Args:
        iterable: passed to ``tqdm``.
        **kwargs: ``tqdm`` options (``total``, ``desc``, ``unit``, ``disable``, ``leave``,
            ``file``...). When the target stream (``file``, default ``sys.stderr``) is not a
            terminal, ``mininterval`` and ``maxinterval`` default to :data:`LOG_INTERVAL_S`,
            ``ncols`` to :data:`LOG_NCOLS` and ``ascii`` to True (explicit values win).

    Returns:
        The ``tqdm`` instance.
    """
    from tqdm import tqdm

    if not stream_is_tty(kwargs.get("file")):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, kwargs["mininterval"]))
        kwargs.setdefault("ncols", LOG_NCOLS)
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, **kwargs)
