"""Reading the TOML configuration files of the agent (``agent.toml``) and the coordinator
(``federation.toml``): one-line errors that name the file and the table, paths relative to the file."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ewtune.accountant.errors import InvalidInputError


def read_toml(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """The parsed document and the resolved path of the file (its directory anchors relative paths)."""
    path = Path(path).expanduser().resolve()
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), path
    except OSError as error:
        raise InvalidInputError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as bad:
        raise InvalidInputError(f"{path} is not UTF-8 text (byte {bad.start}): not a TOML file") from None
    except tomllib.TOMLDecodeError as bad:
        raise InvalidInputError(f"{path} is not valid TOML: {bad}") from None


def table(document: Mapping[str, Any], name: str, path: Path) -> Mapping[str, Any]:
    found = document.get(name)
    if not isinstance(found, dict):
        raise InvalidInputError(f"{path} lacks the [{name}] table")
    return found


def optional_table(document: Mapping[str, Any], name: str, path: Path) -> Mapping[str, Any]:
    """The ``[name]`` table, or an empty one when the file has none."""
    return table(document, name, path) if name in document else {}


def strings(value: Any, what: str, path: Path) -> tuple[str, ...]:
    """A TOML array of strings as a tuple."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidInputError(f"{path}: {what} must be an array of strings, got {value!r}")
    return tuple(value)


def required(section_table: Mapping[str, Any], key: str, section: str, path: Path) -> Any:
    if key not in section_table:
        raise InvalidInputError(f"{path}: [{section}] needs {key}")
    return section_table[key]


def resolve(base: Path, value: Any) -> Path:
    """``value`` as a path, relative ones taken from ``base`` (the configuration file's directory)."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise InvalidInputError(f"a path must be a non-empty string without NUL, got {value!r}")
    candidate = Path(value).expanduser()
    return candidate if candidate.is_absolute() else (base / candidate).resolve()
