"""Docs that cannot drift: every command quoted in README.md, BENCHMARKS.md and deploy/README.md exists.

A command is quoted in a code block (fenced or indented) or in an inline code span: ``ewtune ...``,
``python -m MODULE ...``, ``python PATH.py`` or ``scripts/NAME ...``. Each distinct ``ewtune`` subcommand path is
walked in ewtune's own argument parser and asked for ``--help`` in-process, and every ``--option`` quoted with it
must be one of that path's options; each distinct ``python -m`` module runs ``--help`` in one subprocess, and the
options quoted with it must appear in its help; a quoted script or Python file must exist (a script executable, with
the options quoted for it in its text). A failure names the document, the line and what is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ewtune.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "BENCHMARKS.md", "deploy/README.md")
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}  # another fence (python, toml, text: a record) is not run

COMMAND = re.compile(r"(?:ewtune|python3? -m [\w.]+|python3? [\w./-]+\.py|scripts/[\w.-]+)(?=\s|$)")
SEPARATOR = re.compile(r"&&|\|\||;|\$\(|(?<!\S)\|(?!\S)|(?<![^\s(])\(")  # between two commands of one line (not `a|b`)
PREFIX = re.compile(r"(?:sudo\s+(?:-u\s+\S+\s+)?)?(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:\.venv/bin/)?")  # sudo -u USER, VAR=value
END_OF_COMMAND = re.compile(r"\s(?:#|>|2>|<)|\)\s*$")  # a comment, a redirection, the end of a subshell
SUBCOMMAND_WORD = re.compile(r"[a-z][a-z0-9-]*")
OPTION = re.compile(r"--[a-z][a-z0-9-]*")


@dataclass(frozen=True)
class QuotedCommand:
    """One command as a document quotes it."""

    doc: str
    line: int
    text: str

    @property
    def words(self) -> list[str]:
        return self.text.split()

    @property
    def options(self) -> list[str]:
        """The long options quoted with it (``[--json]``, ``--mode=lora`` and ``--policy certified|edgeworth`` alike)."""
        return [match.group() for word in self.words[1:] if (match := OPTION.match(word.strip("[]()")))]

    def where(self) -> str:
        return f"{self.doc}:{self.line}: `{self.text}`"


def code_lines(text: str):
    r"""(line number, code) for every line of a fenced shell block or an indented block (a line ending in ``\``
    joined with the next), and every inline code span of the other lines."""
    fence, previous_blank, in_indented, continued = None, True, False, None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip().lower()
            continue
        in_indented = fence is None and line.startswith("    ") and (previous_blank or in_indented)
        previous_blank = not stripped
        if fence in SHELL_FENCES or in_indented:
            start, code = continued or (number, "")
            continued = (start, code + stripped[:-1].rstrip() + " ") if stripped.endswith("\\") else None
            if continued is None:
                yield start, code + stripped
        elif fence is None:
            yield from ((number, span) for span in re.findall(r"`([^`]+)`", line))


def quoted_commands(doc: str, text: str) -> list[QuotedCommand]:
    """The commands at the start of a line or span, or after a shell separator (``&&``, ``;``, `` | ``, ``$(``), past
    ``sudo -u USER`` and variable assignments; a word of another command (``flwr ... ewtune``) is not one."""
    commands = []
    for number, code in code_lines(text):
        for segment in SEPARATOR.split(code):
            segment = segment.strip()
            segment = segment[PREFIX.match(segment).end():]
            if COMMAND.match(segment):
                end = END_OF_COMMAND.search(segment)
                commands.append(QuotedCommand(doc, number, (segment[: end.start()] if end else segment).rstrip()))
    return commands


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return None


def _options(parsers: list[argparse.ArgumentParser]) -> set[str]:
    return {option for parser in parsers for option in parser._option_string_actions}


def ewtune_problems(commands: list[QuotedCommand]) -> list[str]:
    """Walk each command's subcommand words through ewtune's parser; ask each distinct path for ``--help``."""
    root = build_parser()
    problems, paths = [], set()
    for command in commands:
        parsers, path = [root], []
        for word in command.words[1:]:
            choices = _subcommands(parsers[-1])
            if word.startswith("-"):
                continue  # an option of the level reached so far; checked below
            if choices is None or not SUBCOMMAND_WORD.fullmatch(word):
                break  # a leaf's arguments, or a placeholder (COMMAND, ..., <id>) where a subcommand would be
            if word not in choices:
                problems.append(f"{command.where()}: `{' '.join(['ewtune', *path, word])}` is not an ewtune command")
                break
            path.append(word)
            parsers.append(choices[word])
        paths.add(tuple(path))
        problems += _unknown_options(command, f"ewtune {' '.join(path)}".strip(), _options(parsers))
    return problems + [problem for path in sorted(paths) if (problem := _help_problem(root, path))]


def _unknown_options(command: QuotedCommand, program: str, known) -> list[str]:
    """One problem naming every option quoted with ``command`` that is not in ``known`` (a set, or a help text)."""
    if isinstance(known, str):
        known = set(re.findall(r"--[a-z][a-z0-9-]*", known))
    unknown = [option for option in dict.fromkeys(command.options) if option not in known]
    return [f"{command.where()}: `{program}` has no option {', '.join(unknown)}"] if unknown else []


def _help_problem(root: argparse.ArgumentParser, path: tuple[str, ...]) -> str | None:
    out = io.StringIO()
    code = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            root.parse_args([*path, "--help"])
    except SystemExit as exited:
        code = exited.code
    if code != 0 or "usage:" not in out.getvalue():
        return f"`ewtune {' '.join(path)} --help` exits {code}: {out.getvalue().strip()[-300:]}"
    return None


def module_problems(commands: list[QuotedCommand], timeout: float = 120.0) -> list[str]:
    """Run ``python -m MODULE --help`` once per distinct module, in parallel; quoted options must be in its help."""
    modules = sorted({command.words[2] for command in commands})
    environment = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")

    def help_of(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO,
                              env=environment, timeout=timeout)

    with ThreadPoolExecutor(max_workers=4) as pool:
        helps = dict(zip(modules, pool.map(help_of, modules)))
    problems = []
    for command in commands:
        module, result = command.words[2], helps[command.words[2]]
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            problems.append(f"{command.where()}: `python -m {module} --help` exits {result.returncode}: {last}")
        else:
            problems += _unknown_options(command, f"python -m {module}", result.stdout)
    return problems


def file_problems(commands: list[QuotedCommand], root: Path) -> list[str]:
    """A quoted ``scripts/NAME`` must be an executable file with the quoted options in its text; a quoted
    ``python PATH.py`` must exist."""
    problems = []
    for command in commands:
        word = command.words[0] if command.words[0].startswith("scripts/") else command.words[1]
        path = root / word
        if not path.is_file():
            problems.append(f"{command.where()}: {word} does not exist")
        elif word.startswith("scripts/"):
            if not os.access(path, os.X_OK):
                problems.append(f"{command.where()}: {word} is not executable")
            problems += _unknown_options(command, word, path.read_text())
    return problems


def doc_problems(docs: dict[str, str], root: Path = REPO) -> list[str]:
    """Every problem of the commands quoted in ``docs`` (name -> Markdown text)."""
    commands = [command for name, text in docs.items() for command in quoted_commands(name, text)]
    kinds = {"ewtune": [], "module": [], "file": []}
    for command in commands:
        first = command.words[0]
        kind = "ewtune" if first == "ewtune" else "module" if len(command.words) > 2 and command.words[1] == "-m" else "file"
        kinds[kind].append(command)
    return ewtune_problems(kinds["ewtune"]) + module_problems(kinds["module"]) + file_problems(kinds["file"], root)


def test_every_command_the_docs_quote_exists():
    docs = {name: (REPO / name).read_text() for name in DOCS}
    assert len([c for name, text in docs.items() for c in quoted_commands(name, text)]) > 100  # the docs were read
    problems = doc_problems(docs)
    assert not problems, "commands quoted in the docs that do not exist:\n" + "\n".join(problems)


SYNTHETIC_DOC = r"""# A doc

Run it:

    ewtune ledger verify PATH [--json]          # exists
    ewtune ledger frobnicate PATH               # no such subcommand
    ewtune accountant epsilon --no-such-flag 3 && ewtune accountant sigma --help

Also `python -m ewtune.no_such_module --json`, `python -m ewtune.bench.train_local --non-private`,
`python -m ewtune.bench.train_local --no-such-option`, `python benchmarks/no_such_script.py` and
`scripts/test --quick` and `scripts/no-such-script`; `ewtune bench` alone and `ewtune COMMAND --help`.

    flwr supernode register KEY ewtune --name ID      # ewtune is an argument here, not a command
    sudo -u someone ewtune agent train-local --model minilm \
        --no-such-continued-option 1
"""


def test_a_doc_that_cites_commands_that_do_not_exist_fails_naming_each_line():
    problems = doc_problems({"doc.md": SYNTHETIC_DOC})
    assert problems == [
        "doc.md:6: `ewtune ledger frobnicate PATH`: `ewtune ledger frobnicate` is not an ewtune command",
        "doc.md:7: `ewtune accountant epsilon --no-such-flag 3`: `ewtune accountant epsilon` has no option --no-such-flag",
        "doc.md:14: `ewtune agent train-local --model minilm --no-such-continued-option 1`: `ewtune agent train-local` has no "
        "option --no-such-continued-option",
        "doc.md:9: `python -m ewtune.no_such_module --json`: `python -m ewtune.no_such_module --help` exits 1: "
        f"{sys.executable}: No module named ewtune.no_such_module",
        "doc.md:10: `python -m ewtune.bench.train_local --no-such-option`: `python -m ewtune.bench.train_local` has no option "
        "--no-such-option",
        "doc.md:10: `python benchmarks/no_such_script.py`: benchmarks/no_such_script.py does not exist",
        "doc.md:11: `scripts/no-such-script`: scripts/no-such-script does not exist",
    ]


def test_commands_are_cut_at_shell_separators_and_comments_and_joined_across_continued_lines():
    commands = quoted_commands("doc.md", SYNTHETIC_DOC)
    assert [(command.line, command.text) for command in commands if command.words[0] == "ewtune"] == [
        (5, "ewtune ledger verify PATH [--json]"),
        (6, "ewtune ledger frobnicate PATH"),
        (7, "ewtune accountant epsilon --no-such-flag 3"),
        (7, "ewtune accountant sigma --help"),
        (11, "ewtune bench"),
        (11, "ewtune COMMAND --help"),
        (14, "ewtune agent train-local --model minilm --no-such-continued-option 1"),  # not `flwr ... ewtune --name ID`
    ]
    assert commands[0].options == ["--json"]
