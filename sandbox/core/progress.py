"""One transient status line on the user's terminal while slow one-time work runs (a first run's builds).

The line is drawn on stderr, then erased (carriage return and erase to
the end of the line) when the work is done, so that nothing of it is left
in the output.  It is drawn only once the CLI has said where (`use`): on a
terminal, never into a file or a pipe.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TextIO

ERASE = "\r\x1b[K"

_stream: TextIO | None = None
_current: str | None = None  # the line shown, if any


def use(stream: TextIO | None) -> None:
    """Draw on `stream` from now on (None: nowhere)."""
    global _stream
    _stream = stream


def _width() -> int:
    try:
        columns = os.get_terminal_size(_stream.fileno()).columns if _stream is not None else 0
    except (OSError, ValueError):
        columns = 0
    return columns or 80  # 0: a terminal whose size nobody set


def _draw(text: str) -> None:
    try:
        # Asked each time: a detached run's stderr becomes its log file.
        if _stream is None or not _stream.isatty():
            return
        # One row at most: erasing a line the terminal wrapped would leave its first rows.
        _stream.write(ERASE + text[: max(_width() - 1, 0)])
        _stream.flush()
    except OSError:
        pass


def show(what: str) -> None:
    """Say what is being done (replacing whatever the line said)."""
    global _current
    _current = f"sandbox: {what}..."
    _draw(_current)


def clear() -> None:
    """Erase the line, if one is shown."""
    global _current
    if _current is not None:
        _current = None
        _draw("")


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """The line says `what` while the block runs, then what it said before (if anything)."""
    global _current
    before = _current
    show(what)
    try:
        yield
    finally:
        clear()
        if before is not None:
            _current = before
            _draw(before)


@contextlib.contextmanager
def hidden() -> Iterator[None]:
    """Out of the way while something else writes a line (a log message), then back."""
    shown = _current
    if shown is not None:
        _draw("")
    try:
        yield
    finally:
        if shown is not None and _current == shown:
            _draw(shown)
