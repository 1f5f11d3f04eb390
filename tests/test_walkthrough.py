"""deploy/README.md followed as written, with two holders, on 127.0.0.1 (issue 22's "done when").

Each host is a directory standing for its file system root: ``/etc``, ``/var``, ``/srv``, ``/run`` and ``/root``
in the README's commands, the unit files' ``ExecStart`` lines and the examples' paths are those directories of the
host the command runs on (the coordinator's, hospital-a's, hospital-b's). The commands are read from the README
and the units, not written here: each ``ewtune`` command line is looked up by its beginning, its placeholders
(``<id>``, ``MODEL_DIR``, ``OUTPUT_DIR``, the ledgers, ``test.csv``) filled in, and run as ``python -m ewtune``;
the configuration files are the shipped examples with the README's edits (its ``[table] key = value`` lines),
the recipe sized by the README's rule. What only an administrator does (users, ``install -o``, systemd, nginx)
is mirrored by copying files; the SuperNodes are started by their daemons (the README's "One user, one host"),
from the example's commented ``[supernode]`` table.

The slow test runs the whole walk on all-MiniLM-L6-v2 and 2 x 800 MR sentences and ends with ``ewtune
evaluate`` of the federation's final weights on 400 sentences no holder has, above their majority class. The
default-suite test walks the same commands up to the federation (keys, cards, initial weights, both
configurations checked, ledgers created) on a tiny model and evaluates the initial weights as the README says.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ewtune.federation.processes import flower_environment, stop_process_group
from ewtune.local_federation import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "deploy" / "README.md"
AGENT_EXAMPLE = REPO / "deploy" / "agent.toml.example"
FEDERATION_EXAMPLE = REPO / "ewtune" / "coordinator" / "federation.toml.example"
HOLDERS = ("hospital-a", "hospital-b")
HOST_ROOTS = re.compile(r"(?<![\w.])/(etc|var|srv|run|root)/")
EPOCHS = 20  # the README's "about 20 epochs over the run"


# -- reading the README and the units ----------------------------------------------------------------------


def readme_code_lines() -> list[str]:
    """The README's code lines (indented by four spaces), without ``sudo -u USER`` and trailing comments."""
    lines = []
    for line in README.read_text().splitlines():
        if line.startswith("    ") and line.strip():
            code = re.sub(r"^sudo -u \S+ ", "", line.strip())
            lines.append(re.sub(r"\s+#.*$", "", code))
    return lines


def readme_command(beginning: str, **placeholders: str) -> str:
    """The README's one command that begins with ``beginning`` (a code line; else a command quoted in its
    text, such as "Check it: `ewtune config check ...`"), its placeholders replaced."""
    matches = {line for line in readme_code_lines() if line.startswith(beginning)}
    if not matches:
        quoted = re.findall(r"`(ewtune [^`]+)`", " ".join(README.read_text().split()))
        matches = {command for command in quoted if command.startswith(beginning)}
    assert len(matches) == 1, f"the README has {len(matches)} commands beginning {beginning!r}: {sorted(matches)}"
    (line,) = matches
    for placeholder, value in placeholders.items():
        assert placeholder in line, f"{placeholder} not in the README's {line!r}"
        line = line.replace(placeholder, value)
    return line


def readme_edits(file_name: str, **placeholders: str) -> list[tuple[str, str, str]]:
    """The README's ``[table] key = value`` edits of ``/etc/ewtune/FILE_NAME`` (the code block after the
    paragraph that names them)."""
    text = README.read_text()
    start = text.index(f"edit of `/etc/ewtune/{file_name}`") if f"edit of `/etc/ewtune/{file_name}`" in text else \
        text.index(f"edits of `/etc/ewtune/{file_name}`")  # fmt: skip
    edits = []
    for line in text[start:].splitlines()[1:]:
        found = re.match(r"^    \[(\w+)\] (\w+) = (.+)$", line)
        if found:
            edits.append(found.groups())
        elif edits and not line.startswith("    "):
            break
    for placeholder, value in placeholders.items():
        edits = [(table, key, value_text.replace(placeholder, value)) for table, key, value_text in edits]
    assert edits, f"the README gives no edits of {file_name}"
    return edits


def unit_command(unit: str) -> str:
    """The ``ExecStart`` of ``deploy/UNIT`` (continuation lines joined), run with this Python's ewtune."""
    text = (REPO / "deploy" / unit).read_text().replace("\\\n", " ")
    (command,) = re.findall(r"^ExecStart=(.+)$", text, re.MULTILINE)
    assert command.startswith("/opt/ewtune/.venv/bin/ewtune "), command
    return " ".join(command.split())[len("/opt/ewtune/.venv/bin/"):]


# -- hosts ---------------------------------------------------------------------------------------------------


class Host:
    """A machine of the README, as a directory standing for its root; runs commands there."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        root.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen] = []

    def local(self, text: str) -> str:
        """``text`` with the host's absolute paths moved under its root."""
        return HOST_ROOTS.sub(lambda found: f"{self.root}/{found.group(1)}/", text)

    def path(self, absolute: str) -> Path:
        return Path(self.local(absolute))

    def arguments(self, command_line: str) -> list[str]:
        words = shlex.split(self.local(command_line))
        assert words[0] == "ewtune", command_line
        return [sys.executable, "-m", "ewtune", *words[1:]]

    def run(self, command_line: str, timeout: float = 600) -> str:
        """Run an ``ewtune`` command line of the README here; its stdout (it must succeed)."""
        result = subprocess.run(self.arguments(command_line), cwd=self.root, env=self.environment(), capture_output=True,
                                text=True, timeout=timeout)  # fmt: skip
        assert result.returncode == 0, f"{self.name}: `{command_line}` exited {result.returncode}: {result.stderr[-2000:]}"
        return result.stdout

    def start(self, command_line: str, log: Path) -> subprocess.Popen:
        """Start a long-running ``ewtune`` command (a unit's ExecStart) in its own session, output to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as output:
            process = subprocess.Popen(self.arguments(command_line), cwd=self.root, env=self.environment(), stdout=output,
                                       stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.processes.append(process)
        return process

    def environment(self) -> dict[str, str]:
        return flower_environment(self.root / "var/lib/flwr-home", {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process_group(process, timeout=20)


def install(source: Path, target: Path, mode: int = 0o644) -> Path:
    """``install -m MODE SOURCE TARGET`` (the owner is this user: one user plays every host)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode)
    return target


def edited_toml(text: str, edits: list[tuple[str, str, str]]) -> str:
    """``text`` with each ``key = ...`` line of ``[table]`` given the README's value (comments kept)."""
    for table, key, value in edits:
        section = re.search(rf"^\[{table}\]$(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
        assert section, f"no [{table}] in the example"
        body, count = re.subn(rf"^{key} = [^#\n]*?(\s*#.*)?$", lambda found: f"{key} = {value}" + (found.group(1) or ""),
                              section.group(1), count=1, flags=re.MULTILINE)  # fmt: skip
        assert count == 1, f"no {key} in [{table}] of the example"
        text = text[: section.start(1)] + body + text[section.end(1):]
    return text


def with_supernode_table(text: str, superlink_port: int, supernode_port: int) -> str:
    """The example's commented ``[supernode]`` table uncommented (the README's "One user, one host"), dialling
    the SuperLink on ``superlink_port`` and serving the local runtime API on ``supernode_port``."""
    start = text.index("# [supernode]")
    table = "\n".join(line[2:] for line in text[start:].splitlines() if line.startswith("# ") and not line.startswith("#  "))
    table = re.sub(r'^superlink = ".*?"', f'superlink = "127.0.0.1:{superlink_port}"', table, flags=re.MULTILINE)
    table = re.sub(r"^port = \d+", f"port = {supernode_port}", table, flags=re.MULTILINE)
    assert f"127.0.0.1:{superlink_port}" in table and f"port = {supernode_port}" in table, table
    return text[:start] + table + "\n"


# -- the walk ------------------------------------------------------------------------------------------------


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


class Walkthrough:
    """The README's hosts and the commands each runs, in the README's order."""

    def __init__(self, work: Path, model_dir: Path, rows_per_holder: int, test_rows: int, rounds: int):
        from ewtune.agent.assets import write_mr_csv

        self.model_dir, self.rounds = model_dir, rounds
        self.coordinator = Host(work / "coordinator", "coordinator")
        self.holders = {holder: Host(work / holder, holder) for holder in HOLDERS}
        with open(write_mr_csv(work / "mr.csv", max_rows=rows_per_holder * len(HOLDERS) + test_rows, seed=0), encoding="utf-8") as handle:
            header, *rows = list(csv.reader(handle))
        for index, holder in enumerate(self.holders.values()):  # each holder's own data, disjoint
            write_rows(holder.path("/srv/ewtune/data/train.csv"), header, rows[index * rows_per_holder:(index + 1) * rows_per_holder])
        self.test_csv = write_rows(self.coordinator.root / "test.csv", header, rows[len(HOLDERS) * rows_per_holder:])
        self.rows_per_holder = rows_per_holder
        self.superlink_port = free_port()

    # Credentials: each holder makes its keys and sends its card; the operator registers the cards.
    def credentials(self) -> None:
        for holder_id, holder in self.holders.items():
            holder.run(readme_command("ewtune agent keys init", **{"<id>": holder_id}))
            shutil.copy(holder.path("/root/ewtune-keys/holder.json"), self.coordinator.root / f"{holder_id}.json")
        self.coordinator.run(readme_command("ewtune keys init /etc/ewtune/coordinator-keys"))
        for holder_id in self.holders:
            self.coordinator.run(readme_command(f"ewtune keys add-holder /etc/ewtune/coordinator-keys {holder_id}.json"))

    # The coordinator host: initial weights, federation.toml from the example with the README's edits, checked.
    def coordinator_host(self) -> Path:
        coordinator = self.coordinator
        coordinator.run(readme_command("ewtune weights init", MODEL_DIR=str(self.model_dir)))
        config = install(FEDERATION_EXAMPLE, coordinator.path("/etc/ewtune/federation.toml"))
        batch, local_steps = readme_recipe(self.rows_per_holder, self.rounds)
        edits = readme_edits("federation.toml", MODEL_DIR=str(self.model_dir))
        edits += [("federation", "rounds", str(self.rounds)), ("federation", "expected_batch_size", str(batch)),
                  ("federation", "local_steps", str(local_steps))]  # fmt: skip
        config.write_text(coordinator.local(edited_toml(config.read_text(), edits)))
        coordinator.run(readme_command("ewtune config check /etc/ewtune/federation.toml"))
        return config

    # Install (one holder): keys and CA in place, the model under /srv/ewtune, agent.toml, its ledger, checked.
    def install_holder(self, holder_id: str, supernode: bool) -> Path:
        holder, keys = self.holders[holder_id], self.holders[holder_id].path("/root/ewtune-keys")
        install(keys / "ledger.key", holder.path("/etc/ewtune/agent-keys/ledger.key"), 0o600)
        install(keys / "supernode.key", holder.path("/etc/ewtune/flower/supernode.key"), 0o600)
        install(self.coordinator.path("/etc/ewtune/coordinator-keys/ca/ca.crt"), holder.path("/etc/ewtune/flower/ca.crt"))
        model = holder.path("/srv/ewtune/models/all-MiniLM-L6-v2")
        model.parent.mkdir(parents=True, exist_ok=True)
        model.symlink_to(self.model_dir, target_is_directory=True)
        for directory in ("/var/lib/ewtune-agent", "/run/ewtune-agent"):  # the unit's StateDirectory and RuntimeDirectory
            holder.path(directory).mkdir(parents=True, mode=0o700)
        config = install(AGENT_EXAMPLE, holder.path("/etc/ewtune/agent.toml"))
        text = edited_toml(config.read_text(), readme_edits("agent.toml", **{"<id>": holder_id}))
        if supernode:
            text = with_supernode_table(text, self.superlink_port, free_port())
        config.write_text(holder.local(text))
        holder.run(readme_command("ewtune agent init --config /etc/ewtune/agent.toml"))
        holder.run(readme_command("ewtune config check /etc/ewtune/agent.toml"))
        return config

    def start_federation(self) -> None:
        """The coordinator's unit (its SuperLink, the holders registered), then each holder's daemon (its unit),
        which starts its SuperNode; until every daemon serves."""
        start = unit_command("ewtune-coordinator.service").replace("--port 9092", f"--port {self.superlink_port}")
        log = self.coordinator.path("/var/lib/ewtune-coordinator/coordinator-start.log")
        superlink = self.coordinator.start(start, log)
        wait_for(log, "registered hospital-b", superlink, 120)
        for holder in self.holders.values():
            holder.start(unit_command("ewtune-agent.service"), holder.path("/var/lib/ewtune-agent/agent.log"))
        for holder in self.holders.values():
            wait_for(holder.path("/var/lib/ewtune-agent/agent.log"), "serving on", holder.processes[-1], 600)

    def evaluate(self, weights: str) -> dict[str, float]:
        """The README's ``ewtune evaluate`` of ``weights`` on the operator's own test.csv: its three figures."""
        output = self.coordinator.run(readme_command("ewtune evaluate", MODEL_DIR=str(self.model_dir),
                                                     **{"OUTPUT_DIR/final.safetensors": weights}))  # fmt: skip
        found = re.search(r"accuracy\s+([\d.]+), macro F1 ([\d.]+), majority-class baseline ([\d.]+)", output)
        assert found, output
        accuracy, f1, baseline = map(float, found.groups())
        return {"accuracy": accuracy, "macro_f1": f1, "majority_baseline": baseline}

    def stop(self) -> None:
        for host in (*self.holders.values(), self.coordinator):
            host.stop()


def readme_recipe(records: int, rounds: int) -> tuple[int, int]:
    """The README's sizing: expected batch at most a fifth of a holder's records (at most the example's 1024),
    local_steps = ceil(20 x records / (batch x rounds))."""
    batch = min(1024, records // 5)
    return batch, math.ceil(EPOCHS * records / (batch * rounds))


def wait_for(log: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not (log.is_file() and text in log.read_text(errors="replace")):
        assert process.poll() is None, f"{log.name}: exited {process.returncode}: {log.read_text(errors='replace')[-2000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {log} after {timeout:g} s"
        time.sleep(0.5)


@pytest.fixture
def work():
    """A short root (the daemons' Unix sockets live under it: a socket path has at most 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="ewt-walk-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_the_readme_commands_set_up_two_holders_and_a_coordinator(work, tiny_pooled_dir):
    """Keys, cards, initial weights, both configurations from the examples (checked), the ledgers, and the
    README's evaluate command on the initial weights: every command as written runs and succeeds."""
    walk = Walkthrough(work, tiny_pooled_dir, rows_per_holder=40, test_rows=30, rounds=3)
    walk.credentials()
    assert (walk.coordinator.path("/etc/ewtune/coordinator-keys/holders") / "hospital-a.pub").is_file()
    config = walk.coordinator_host()
    assert 'expected_batch_size = 8' in config.read_text() and "local_steps = 34" in config.read_text()
    for holder_id in HOLDERS:
        agent_toml = walk.install_holder(holder_id, supernode=True)
        assert f'id = "{holder_id}"' in agent_toml.read_text()
        assert walk.holders[holder_id].path("/var/lib/ewtune-agent/ledger.jsonl").is_file()
    figures = walk.evaluate(str(walk.coordinator.path("/etc/ewtune/initial.safetensors")))
    assert 0.0 <= figures["accuracy"] <= 1.0 and 0.5 <= figures["majority_baseline"] <= 1.0


@pytest.mark.slow
def test_the_readme_walkthrough_ends_with_a_model_above_the_majority_class(work, capsys):
    """The whole README with all-MiniLM-L6-v2: two holders of 800 MR sentences each, the example's 3 rounds of the
    probe at target epsilon 7.5, every holder's private evaluation, status, the ledgers cross-checked, and the
    final weights evaluated on 400 sentences no holder has."""
    from ewtune.agent.assets import minilm_model_dir

    started = time.monotonic()
    walk = Walkthrough(work, minilm_model_dir(), rows_per_holder=800, test_rows=400, rounds=3)
    try:
        walk.credentials()
        walk.coordinator_host()
        for holder_id in HOLDERS:
            walk.install_holder(holder_id, supernode=True)
        walk.start_federation()
        table = walk.coordinator.run(readme_command("ewtune coordinator run"), timeout=1200)
        status_table = walk.coordinator.run(readme_command("ewtune coordinator status"))
        for holder_id, holder in walk.holders.items():  # the holders send copies of their ledgers
            shutil.copy(holder.path("/var/lib/ewtune-agent/ledger.jsonl"), walk.coordinator.root / f"{holder_id}.jsonl")
        walk.coordinator.run(readme_command("ewtune ledger crosscheck", COORDINATOR_LEDGER="/var/lib/ewtune-coordinator/ledger.jsonl",
                                            HOLDER_A_LEDGER="hospital-a.jsonl", HOLDER_B_LEDGER="hospital-b.jsonl"))  # fmt: skip
        output_dir = walk.coordinator.path("/var/lib/ewtune-coordinator/runs/sentiment")
        figures = walk.evaluate(str(output_dir / "final.safetensors"))
    finally:
        walk.stop()
    status = json.loads((output_dir / "status.json").read_text())
    assert status["state"] == "finished", status.get("reason")
    for holder_id in HOLDERS:
        assert holder_id in table and holder_id in status_table
        assert set(status["holders"][holder_id]["accuracy"]) == {"0", "1", "2", "3"}  # the example's private evaluations
        assert status["holders"][holder_id]["epsilon_certified"] <= 8.0
    with capsys.disabled():
        print(f"\nwalkthrough: {time.monotonic() - started:.0f} s; final weights on {walk.test_csv.name}: {figures}")
    assert figures["accuracy"] > figures["majority_baseline"] + 0.05, figures
