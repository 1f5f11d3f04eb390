"""Validating a configuration file as a whole: every problem (unknown table or key, wrong type, value out of
range, unreadable file, private key readable by others) is collected with the file, the key and the reason,
so that an operator fixes them all at once; nothing starts while any remains.

The rules of a table are those of the dataclass its loader builds (``ewtune.agent.policy.HolderPolicy``,
``ewtune.coordinator.planner.FederationSettings``...): its fields are the allowed keys, its annotations the types,
and its own ``__post_init__`` the ranges, each key checked alone against the defaults
(:func:`check_dataclass_table`), so the check and the loader cannot drift apart.

Why this module sits in ``ewtune/accountant/`` and not in ``ewtune/federation/`` (issue 21): it is the generic
half of the configuration layer, not a shape: the shapes are the loaders' dataclasses, which stay with the side that
reads its file (``ewtune/agent/`` and ``ewtune/coordinator/``, each with its own ``config_check``), and neither file
travels between a holder and the coordinator, which is all ``ewtune/federation/`` holds (what they exchange over
Flower). Its other half, :mod:`ewtune.accountant.tomlfiles` (the reader both loaders use, whose ``resolve`` this
module applies to the paths a file names), lives here too: the two are one layer, shared by both sides and free
of torch and flwr as this package is, and would leave it together, not one without the other.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ewtune.accountant.errors import EwtuneError, InvalidInputError
from ewtune.accountant.tomlfiles import resolve


@dataclass(frozen=True)
class Problem:
    """One thing wrong in ``path``: the key (``[table] key``, or ``[table]``) and the reason."""

    path: Path
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.key}: {self.reason}"


@dataclass
class Problems:
    """What :func:`check_*` found in one file."""

    path: Path
    found: list[Problem] = field(default_factory=list)

    def add(self, key: str, reason: str) -> None:
        self.found.append(Problem(self.path, key, reason))

    def raise_if_any(self) -> None:
        """One :class:`InvalidConfiguration` naming every problem (one line, ``;`` between them)."""
        if self.found:
            raise InvalidConfiguration(self)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "ok": not self.found,
            "problems": [{"key": problem.key, "reason": problem.reason} for problem in self.found],
        }


class InvalidConfiguration(InvalidInputError):
    def __init__(self, problems: Problems):
        count = len(problems.found)
        details = "; ".join(f"{problem.key}: {problem.reason}" for problem in problems.found)
        super().__init__(f"{problems.path}: {count} problem{'s' * (count != 1)}, nothing started: {details}")
        self.problems = problems


def key_name(table: str, key: str | None = None) -> str:
    return f"[{table}]" if key is None else f"[{table}] {key}"


def check_tables(document: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...],
                 problems: Problems) -> None:
    """Every table present is known, and every required one is there."""
    for name, value in document.items():
        if name not in required + optional:
            problems.add(key_name(name), f"unknown table (known: {', '.join(required + optional)})")
        elif not isinstance(value, dict):
            problems.add(key_name(name), f"must be a table, got {type(value).__name__}")
    for name in required:
        if name not in document:
            problems.add(key_name(name), "missing table")


def section(document: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """The table ``name`` when it is one, else an empty one (its absence is reported by :func:`check_tables`)."""
    value = document.get(name)
    return value if isinstance(value, dict) else {}


def unknown_key(key: str, known: Iterable[str]) -> str:
    """The problem of an unknown ``key``, naming the known key it most likely meant (``max-examples``,
    ``max_example``: ``max_examples``), then every known key."""
    known = sorted(known)
    close = difflib.get_close_matches(key.replace("-", "_").lower(), known, n=1, cutoff=0.7)
    meant = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{meant} (known: {', '.join(known)})"


def check_keys(values: Mapping[str, Any], table: str, allowed: tuple[str, ...], problems: Problems,
               required: tuple[str, ...] = ()) -> None:
    for key in values:
        if key not in allowed:
            problems.add(key_name(table, key), unknown_key(key, allowed))
    for key in required:
        if key not in values:
            problems.add(key_name(table, key), "missing")


def check_dataclass_table(cls: type, values: Mapping[str, Any], table: str, problems: Problems, *,
                          base: Mapping[str, Any] | None = None, keys: Mapping[str, str] | None = None,
                          exclude: tuple[str, ...] = ()) -> None:
    """Check ``values`` (a table) against dataclass ``cls``: unknown keys, required keys, each key's type from
    the field's annotation, then each key alone through ``cls(**base, key=value)`` (its ``__post_init__``
    rules), then all keys together (the rules between keys). ``keys``: TOML key -> field name, the only keys
    allowed (default: every field but ``exclude``); ``base``: valid values for the fields the table does not
    set and the class requires."""
    fields = {item.name: item for item in dataclasses.fields(cls)}
    keys = dict(keys) if keys is not None else {name: name for name in fields if name not in exclude}
    base = dict(base or {})
    arguments, each_ok = {}, True
    for key, value in values.items():
        if key not in keys:
            problems.add(key_name(table, key), unknown_key(key, keys))
            each_ok = False
            continue
        name = keys[key]
        expected = _type_problem(fields[name].type, value)
        if expected:
            problems.add(key_name(table, key), f"must be {expected}, got {value!r}")
            each_ok = False
            continue
        try:
            cls(**{**base, name: value})
        except (EwtuneError, TypeError, ValueError) as bad:
            problems.add(key_name(table, key), str(bad))
            each_ok = False
            continue
        arguments[name] = value
    for key, name in keys.items():
        field_ = fields[name]
        if key not in values and field_.default is dataclasses.MISSING and field_.default_factory is dataclasses.MISSING:
            problems.add(key_name(table, key), "missing")
            each_ok = False
    if each_ok:
        try:
            cls(**{**base, **arguments})
        except (EwtuneError, TypeError, ValueError) as bad:
            problems.add(key_name(table), str(bad))


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),)}


def _type_problem(annotation: str, value: Any) -> str | None:
    """What ``value`` should be under a field annotation (as text: the modules use postponed annotations),
    or None when it fits. Lists fit ``tuple[...]`` and ``dict`` fits a mapping."""
    options = [part.strip() for part in str(annotation).split("|")]
    for option in options:
        if option.startswith("tuple") and isinstance(value, list):
            return None
        if option.startswith(("dict", "Mapping")) and isinstance(value, dict):
            return None
        accepted = _TYPES.get(option)
        if accepted and isinstance(value, accepted) and (bool in accepted or not isinstance(value, bool)):
            return None
        if option in ("Any", "Path"):
            return None
    words = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "None": ""}
    return " or ".join(filter(None, (words.get(option.split("[")[0], "a list" if option.startswith("tuple") else option)
                                     for option in options)))


def check_readable_file(values: Mapping[str, Any], table: str, key: str, base: Path, problems: Problems,
                        private: bool = False) -> Path | None:
    """``[table] key`` names a readable file (``private``: readable by its owner only, as a private key must
    be); returns its resolved path."""
    if not isinstance(values.get(key), str):
        return None
    path = resolve(base, values[key])
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as error:
        problems.add(key_name(table, key), f"cannot read {path}: {error.strerror or error}")
        return None
    if private and stat.S_IMODE(os.stat(path).st_mode) & 0o077:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        problems.add(key_name(table, key), f"private key {path} has mode {mode:04o}: others can read it (chmod 600)")
    return path


def check_directory(values: Mapping[str, Any], table: str, key: str, base: Path, problems: Problems,
                    must_contain: str | None = None) -> Path | None:
    """``[table] key`` names an existing directory (holding ``must_contain`` when given)."""
    if not isinstance(values.get(key), str):
        return None
    path = resolve(base, values[key])
    if not path.is_dir():
        problems.add(key_name(table, key), f"{path} is not a directory")
        return None
    if must_contain and not (path / must_contain).is_file():
        problems.add(key_name(table, key), f"{path} has no {must_contain}: not a model directory")
        return None
    return path


def check_parent_writable(values: Mapping[str, Any], table: str, key: str, base: Path, problems: Problems) -> None:
    """``[table] key`` names a file whose directory exists (or can be made) and is writable."""
    if not isinstance(values.get(key), str):
        return
    directory = resolve(base, values[key]).parent
    existing = next(parent for parent in (directory, *directory.parents) if parent.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        problems.add(key_name(table, key), f"{existing} is not writable by this user")
