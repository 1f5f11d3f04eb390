"""Progress of long work (local training, federated rounds, the demo), for people and for machines.

A command makes one :class:`Progress` from its flags (:meth:`Progress.from_args`) and reports through it:

- ``event(kind, text, **fields)``: something happened (a phase began, a round ended): a line of text;
- ``update(kind, text, **fields)``: a frequent measurement (a training step): a live line on a terminal.

Where it goes depends on the flags and on where stderr leads:

- ``--quiet``: nothing at all;
- ``--json``: one JSON object per event and per update, a line each, ``{"event": KIND, "elapsed_seconds": ...,
  "message": TEXT, **fields}``;
- a terminal: each event as a line; updates rewrite one live line in place (at most ten times a second);
- anything else (a pipe, a file, a CI log): each event as a line; updates are left out.

All of it goes to stderr: stdout carries the command's result, which with ``--json`` stays one JSON document.
Only the standard library is imported, so that the holder's and the coordinator's commands may both use it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

QUIET, JSON_LINES, LIVE, LINES = "quiet", "json", "live", "lines"
LIVE_INTERVAL = 0.1  # seconds between two redraws of the live line
QUIET_HELP = "no progress output (the result is still printed)"


def add_quiet_flag(parser) -> None:
    """The ``--quiet`` flag every command that reports progress takes."""
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)


class Progress:
    """Reports events and updates to ``stream`` (default stderr) in one of four modes: ``quiet``, ``json``,
    ``live`` (a terminal) or ``lines`` (see the module docstring). ``mode=None`` picks ``live`` when the stream is
    a terminal and ``lines`` otherwise."""

    def __init__(self, stream: TextIO | None = None, mode: str | None = None, clock: Callable[[], float] = time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        if mode is None:
            mode = LIVE if _is_terminal(self.stream) else LINES
        if mode not in (QUIET, JSON_LINES, LIVE, LINES):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self._clock = clock
        self._started = clock()
        self._live_width = 0  # characters of the live line now on the terminal (0: none)
        self._last_drawn = -math.inf

    @classmethod
    def from_args(cls, args, stream: TextIO | None = None) -> Progress:
        """``--quiet`` wins over ``--json``; without either, the stream decides (terminal or not)."""
        if getattr(args, "quiet", False):
            return cls(stream, QUIET)
        return cls(stream, JSON_LINES if getattr(args, "json", False) else None)

    @property
    def elapsed(self) -> float:
        """Seconds since this reporter was made."""
        return self._clock() - self._started

    def event(self, kind: str, text: str, **fields: Any) -> None:
        """Something happened: a line of ``text`` (quiet: nothing; json: one object with ``fields``)."""
        if self.mode == JSON_LINES:
            self._write_json(kind, text, fields)
        elif self.mode in (LIVE, LINES):
            self._clear_live_line()
            self.stream.write(text + "\n")
            self.stream.flush()

    def printer(self, kind: str) -> Callable[[str], None]:
        """A callable reporting each text it is given as an event of ``kind`` (for code that logs lines)."""
        return lambda text: self.event(kind, text)

    def update(self, kind: str, text: str, **fields: Any) -> None:
        """A frequent measurement: the live line on a terminal, redrawn at most every ``LIVE_INTERVAL`` seconds
        (json: one object each time; lines and quiet: nothing)."""
        if self.mode == JSON_LINES:
            self._write_json(kind, text, fields)
        elif self.mode == LIVE:
            now = self._clock()
            if now - self._last_drawn < LIVE_INTERVAL:
                return
            self._last_drawn = now
            line = text[: max(_columns(self.stream) - 1, 20)]  # a wrapped line could not be rewritten in place
            self.stream.write("\r" + line.ljust(self._live_width))
            self.stream.flush()
            self._live_width = max(self._live_width, len(line))

    def close(self) -> None:
        """Clears the live line, if any."""
        self._clear_live_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _write_json(self, kind: str, text: str, fields: dict[str, Any]) -> None:
        record = {"event": kind, "elapsed_seconds": round(self.elapsed, 3), "message": text, **fields}
        self.stream.write(json.dumps(_json_safe(record)) + "\n")
        self.stream.flush()

    def _clear_live_line(self) -> None:
        if self._live_width:
            self.stream.write("\r" + " " * self._live_width + "\r")
            self.stream.flush()
            self._live_width = 0
            self._last_drawn = -math.inf  # the next update draws at once


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as null (JSON has no NaN) and paths and the like as text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if value is None or isinstance(value, (str, int)):
        return value
    return str(value)


def _columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to (stdout may be redirected while stderr is not)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
