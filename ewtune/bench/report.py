"""What every benchmark shares: timing, the machine and its load, checking counts given on the command line, and
writing the results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ewtune.accountant.errors import InvalidInputError


def timed(work: Callable[[], Any]) -> tuple[Any, float]:
    """(what ``work`` returns, its wall-clock seconds)."""
    start = time.perf_counter()
    value = work()
    return value, time.perf_counter() - start


def process_seconds(command: Sequence[str], env: dict[str, str] | None = None) -> float:
    """Wall-clock seconds of ``command`` as a whole process, start to exit; a failure is an error."""
    _, seconds = timed(lambda: subprocess.run(command, capture_output=True, check=True, env=env))
    return seconds


def machine() -> dict[str, Any]:
    """The machine and its load now (these machines are shared: read figures with the load beside them)."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": list(os.getloadavg())}


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def write(report: dict[str, Any], markdown: str, json_path: str | os.PathLike | None, markdown_path: str | os.PathLike | None) -> None:
    """Print ``markdown``; write ``report`` as JSON and the markdown where asked (making their folders)."""
    print(markdown, end="" if markdown.endswith("\n") else "\n")
    for path in (json_path, markdown_path):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    if markdown_path:
        Path(markdown_path).write_text(markdown if markdown.endswith("\n") else markdown + "\n")


def positive_int(name: str, text: str) -> int:
    """The option ``name``'s value ``text`` as an integer >= 1, or a one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise InvalidInputError(f"{name} must be an integer, got {text!r}") from None
    if value < 1:
        raise InvalidInputError(f"{name} must be >= 1, got {value}")
    return value
