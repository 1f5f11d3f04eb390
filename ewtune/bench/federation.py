"""``ewtune bench federation``: coordination overhead per round on loopback, ewtune's message path against
Flower's defaults, side by side in one run, with 3, 10 and 20 holders (``--holders``; 30 needs more cores than
the 2 of the development machine: on a lent 16-core machine), and what each holder costs as holders are added.

Overhead of a round = its wall time at the coordinator (reserve, send, wait for every reply, verify receipts,
aggregate, commit, checkpoint) minus the slowest holder's local DP-SGD time in that round, read from the
holder's own ledger (its reserve -> commit time). Holders do not release their training time in their replies
(it would leak their Poisson batch sizes); on this one machine the benchmark can read their ledgers instead.

Each configuration is a fresh federation on this machine (TLS SuperLink with SuperNode authentication, one
agent daemon with its SuperNode per holder, MiniLM + MR in head mode, so that local training is short and the
overhead is what is measured), running the same plan with evaluation every round:

- ``ewtune``: the SuperNode under :mod:`ewtune.agent.warm_supernode` (one warm task loop serves every message, short
  waits while a run is active), replies pulled every 0.1 s, a reply's lagging objects re-pulled after 50 ms,
  weights packed in one buffer, evaluation inside the train message (one message per holder per round);
- ``flower-defaults`` (the baseline): Flower's own ``flower-supernode`` (a fresh ClientApp process per message
  started by ``flower-superexec``, its 3 s idle poll and 0.5 s waits), replies pulled every 3 s as
  ``Grid.send_and_receive`` does, Flower's object backoff, one Flower ``Array`` per tensor. One setting is not
  Flower's default, in the baseline's favour: ``flower-superexec`` polls for tasks every 0.1 s (Flower: 1 s), as
  every Flower process ewtune starts does (:mod:`ewtune.federation.processes`).

The table gives medians over rounds (round 1, which pays each process's first message, is left out of the
medians and kept in the JSON) and the ratio baseline / ewtune. Beside the wall times it gives the SuperLink's CPU
seconds per round (rounds 2 and later): the one process that serves every holder's polls and object transfers,
whose work grows with the federation, and a figure that the machine's other load barely moves.

Per holder and round (rounds 2 and later), a second table gives what the federation's size does to each
holder: the Flower requests it makes (its empty pulls apart) and the Runtime API's (the ServerApp's and the
SuperExec's) divided among the holders, counted inside the SuperLink by :mod:`ewtune.bench.superlink_requests`; its daemon's and its SuperNode's
resident memory after round 1 and after the last round (:mod:`ewtune.bench.holder_memory`); and that nothing
was lost: every round completed, every holder's reply accepted in every round, and as many training commits
per holder as rounds in the coordinator's ledger and in the holder's own.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ewtune.accountant.errors import InvalidInputError
from ewtune.bench.report import machine, write

if TYPE_CHECKING:
    from ewtune.accountant.entries import CommitEntry, ReserveEntry

    Rounds = dict[int, tuple[ReserveEntry, CommitEntry]]  # round -> (reserve, commit) of one holder in one ledger

# name -> settings of the SuperNode, the ServerApp's reply polling and its object backoff, the weights' packing.
CONFIGURATIONS = {
    "ewtune": {"isolation": "warm", "poll_interval": 0.1, "short_waits": True, "pack_weights": True},
    "flower-defaults": {"isolation": "subprocess", "poll_interval": 3.0, "short_waits": False, "pack_weights": False},
}
GOAL_SECONDS, TARGET_SECONDS = 2.0, 3.0
PARTS = ("deliver", "train", "return", "aggregate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--holders", type=int, nargs="+", default=[3, 10, 20],
                        help="federation sizes to measure (default: 3 10 20; 30 on a machine with 16 cores)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per configuration (default 5; round 1 is left out of medians)")
    parser.add_argument("--local-steps", type=int, default=2, help="DP-SGD steps per holder per round (default 2)")
    parser.add_argument("--rows-per-holder", type=int, default=120)
    parser.add_argument("--configurations", nargs="+", choices=list(CONFIGURATIONS), default=list(CONFIGURATIONS))
    parser.add_argument("--baseline-max-holders", type=int, default=10,
                        help="measure flower-defaults only up to this many holders (default 10: its rounds take a minute at 20, "
                             "its comparison is made at 3 and 10)")
    parser.add_argument("--json", help="write the results as JSON here (default benchmarks/results/federation.json)",
                        default="benchmarks/results/federation.json")
    parser.add_argument("--markdown", help="write the table here (default benchmarks/results/federation.md)",
                        default="benchmarks/results/federation.md")
    parser.add_argument("--work-dir", help="keep credentials, ledgers and logs here (default: a temporary directory)")


def run(args: argparse.Namespace) -> int:
    if args.rounds < 2 or args.local_steps < 1 or min(args.holders) < 1:
        raise InvalidInputError("--rounds must be >= 2, --local-steps and --holders >= 1")
    before, started = machine(), time.monotonic()
    results: dict[str, dict[str, Any]] = {}
    for holders in args.holders:
        for name in args.configurations:
            if name == "flower-defaults" and holders > args.baseline_max_holders:
                continue
            key = f"{name}/{holders}"
            print(f"measuring {key}: {args.rounds} rounds", flush=True)
            if args.work_dir:
                status = _measure(Path(args.work_dir).resolve() / key.replace("/", "-"), args, holders, CONFIGURATIONS[name])
            else:
                with tempfile.TemporaryDirectory(prefix="ewtune-bench-federation-") as work:
                    status = _measure(Path(work), args, holders, CONFIGURATIONS[name])
            results[key] = {"configuration": name, "holders": holders, **_summary(status)}
    report = {
        "benchmark": "federation",
        "command": f"ewtune bench federation --holders {' '.join(map(str, args.holders))} --rounds {args.rounds} "
                   f"--local-steps {args.local_steps} --rows-per-holder {args.rows_per_holder} --baseline-max-holders {args.baseline_max_holders}",
        "definition": "overhead per round = round wall time at the coordinator - slowest holder's reserve->commit time in its own ledger",
        "configurations": CONFIGURATIONS,
        "goal_seconds": GOAL_SECONDS,
        "target_seconds": TARGET_SECONDS,
        "machine_before": before,
        "machine_after": machine(),
        "wall_seconds": time.monotonic() - started,
        "results": results,
        "ratios_flower_defaults_over_ewtune": _ratios(results, args.holders),
    }
    write(report, _markdown(report), args.json, args.markdown)
    return 0


def _measure(work: Path, args: argparse.Namespace, holders: int, configuration: dict[str, Any]) -> dict[str, Any]:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.agent.assets import minilm_model_dir, write_mr_csv
    from ewtune.bench import superlink_requests
    from ewtune.bench.holder_memory import HolderMemory
    from ewtune.local_federation import FederationJob, HolderSetup, LocalFederation, initial_weights, partition_csv

    names = [f"holder-{index:02d}" for index in range(holders)]
    source = write_mr_csv(work / "data" / "mr.csv", max_rows=args.rows_per_holder * holders, seed=0)
    partitions = partition_csv(source, work / "data", holders, names)
    model_dir = minilm_model_dir()
    training = {"model_dir": str(model_dir), "max_length": 32, "mode": "head", "physical_batch_size": 64, "eval_fraction": 0.1}
    supernode = {"isolation": configuration["isolation"]}
    setups = [HolderSetup(name, path, budget_epsilon=100.0, training=training, supernode=supernode) for name, path in zip(names, partitions)]
    weights = initial_weights(model_dir, work / "initial.safetensors", training)
    request_log = work.resolve() / "coordinator" / "superlink-requests.jsonl"
    recorder = [superlink_requests.__name__, "--request-log", str(request_log)]
    with LocalFederation(work, setups, log=print, superlink_launcher=recorder) as federation:
        federation.start()
        federation.wait_for_daemons()
        job = FederationJob(
            federation={
                "name": "bench", "rounds": args.rounds, "local_steps": args.local_steps, "expected_batch_size": 8,
                "clip_norm": 1.0, "learning_rate": 0.5, "target_epsilon": 8.0, "delta": 1e-5,
                "min_holders": holders, "expected_holders": holders,
            },
            model={"initial_weights": str(weights), "mode": "head", "evaluate": "every_round", "pack_weights": configuration["pack_weights"]},
            timeouts={"nodes": 300, "query": 120, "round": 600, "poll_interval": configuration["poll_interval"],
                      "short_waits": configuration["short_waits"]},
        )
        meter = SuperLinkCpu(federation.processes["superlink"].pid)
        memory = HolderMemory({name: federation.processes[f"agent:{name}"].pid for name in names})
        status = federation.run(job, on_status=lambda update: (meter.on_status(update), memory.on_status(update)), timeout=3600)
        if status.get("state") != "finished":
            raise RuntimeError(f"the run ended {status.get('state')}: {status.get('reason')}")
        committed = committed_rounds(work, status["run_id"], names)
        status["breakdown"] = ledger_breakdown(committed)
        status["nothing_lost"] = nothing_lost(status, committed, args.rounds)
        status["superlink_cpu_seconds_per_round"] = meter.per_round_after_first()
        status["memory"] = memory.first_and_last()
        phases = superlink_requests.requests_by_phase(
            superlink_requests.read_records(request_log), {node: name for name, node in federation.node_ids.items()}
        )
        status["requests"] = superlink_requests.per_round(phases, names, args.rounds)
    return status


class SuperLinkCpu:
    """The SuperLink process's CPU time (user + system, all its threads) read at each status update, so that
    its CPU seconds per round can be taken between the end of round 1 and the end of the last round."""

    def __init__(self, pid: int):
        # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
        import psutil

        self.process = psutil.Process(pid)
        self.at_rounds: dict[int, float] = {}  # rounds completed -> CPU seconds then (the first reading of each)

    def on_status(self, status: dict[str, Any]) -> None:
        times = self.process.cpu_times()
        self.at_rounds.setdefault(len(status.get("rounds", [])), times.user + times.system)

    def per_round_after_first(self) -> float | None:
        rounds = sorted(r for r in self.at_rounds if r >= 1)
        if len(rounds) < 2:
            return None
        first, last = rounds[0], rounds[-1]
        return (self.at_rounds[last] - self.at_rounds[first]) / (last - first)


def committed_rounds(work: Path, run_id: str, holders) -> dict[str, tuple[Rounds, Rounds]]:
    """holder -> (round -> (reserve, commit) of its training in the coordinator's ledger, the same in its own)."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.coordinator.ledger_crosscheck import read_entries

    coordinator = read_entries(work / "coordinator" / "ledger.jsonl")
    return {
        holder: (
            _reserve_commit_by_round(coordinator, run_id, holder),
            _reserve_commit_by_round(read_entries(work / "holders" / holder / "ledger.jsonl"), run_id, holder),
        )
        for holder in holders
    }


def nothing_lost(status: dict[str, Any], committed: dict[str, tuple[Rounds, Rounds]], rounds: int) -> dict[str, Any]:
    """Whether the run lost nothing: every round completed, every holder's reply accepted (committed) in every
    round, and ``rounds`` training commits per holder in the coordinator's ledger and in the holder's own."""
    holders = len(committed)
    accepted = sum(1 for record in status["rounds"] for outcome in record["holders"].values() if outcome.get("status") == "committed")
    commits = {holder: [len(coordinator), len(own)] for holder, (coordinator, own) in committed.items()}
    return {
        "rounds_completed": status.get("rounds_completed"),
        "replies_accepted": accepted,
        "replies_expected": rounds * holders,
        "ledger_commits": commits,  # holder -> [in the coordinator's ledger, in its own]
        "complete": status.get("rounds_completed") == rounds and accepted == rounds * holders
                    and all(counts == [rounds, rounds] for counts in commits.values()),
    }


def ledger_breakdown(committed: dict[str, tuple[Rounds, Rounds]]) -> list[dict[str, Any]]:
    """Per round and holder, from the ledgers' timestamps (one clock, one machine): ``deliver`` = coordinator
    reserve -> holder reserve (Flower's delivery, the ClientApp, the daemon's evaluation, plan and budget
    checks), ``train`` = holder reserve -> holder commit (DP-SGD and the holder's ledger), ``return`` = holder
    commit -> coordinator commit (Flower's return path, receipt checks, earlier commits)."""
    rows = []
    for holder, (coordinator, own) in committed.items():
        for round, (reserve, commit) in sorted(coordinator.items()):
            if round in own:
                held_reserve, held_commit = own[round]
                rows.append({
                    "round": round, "holder": holder,
                    "deliver_seconds": _seconds(held_reserve) - _seconds(reserve),
                    "train_seconds": _seconds(held_commit) - _seconds(held_reserve),
                    "return_seconds": _seconds(commit) - _seconds(held_commit),
                })
    return rows


def _reserve_commit_by_round(entries, run_id: str, holder: str) -> Rounds:
    """round -> (reserve, commit) of the training events of ``holder`` in ``run_id`` (evaluations left out)."""
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.accountant.entries import reservations_and_commits
    from ewtune.accountant.ledger_payloads import EVALUATION_PURPOSE

    reservations, commits = reservations_and_commits(entries)
    reserves = {seq: r for seq, r in reservations.items() if r.run_id == run_id and (r.holder or holder) == holder}
    return {
        reserves[commit.reservation].round: (reserves[commit.reservation], commit) for commit in commits
        if commit.reservation in reserves and commit.purpose != EVALUATION_PURPOSE
    }


def _seconds(entry: ReserveEntry | CommitEntry) -> float:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.accountant.ledger_lines import parse_time

    return parse_time(entry.time).timestamp()


def round_overheads(rounds: list[dict[str, Any]], breakdown: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: its wall time at the coordinator, the slowest holder's training time from the ledgers, their
    difference (the overhead) and ``aggregate`` (after the last reply: verify, commit, average, checkpoint);
    a round with no ledger row has None for the training time and the overhead."""
    slowest: dict[int, float] = {}
    for row in breakdown:
        slowest[row["round"]] = max(slowest.get(row["round"], 0.0), row["train_seconds"])
    result = []
    for record in rounds:
        train = slowest.get(record["round"])
        result.append({
            "round": record["round"],
            "seconds": record["seconds"],
            "aggregate_seconds": record["seconds"] - record["exchange_seconds"],
            "slowest_train_seconds": train,
            "overhead_seconds": None if train is None else record["seconds"] - train,
        })
    return result


def _summary(status: dict[str, Any]) -> dict[str, Any]:
    # deferred: ewtune/bench/cli.py imports every bench module to register its arguments; a benchmark loads its parts when run
    from ewtune.bench.superlink_requests import steady_rates

    breakdown = status.get("breakdown", [])
    rounds = round_overheads(status["rounds"], breakdown)
    steady = [r for r in rounds if r["round"] > 1 and r["overhead_seconds"] is not None]
    if not steady:
        raise RuntimeError(f"run {status['run_id']}: no holder ledger recorded a committed round after the first")
    steady_rows = [row for row in breakdown if row["round"] > 1]
    return {
        "run_id": status["run_id"],
        "rounds": rounds,
        "breakdown": breakdown,
        "median_round_seconds": statistics.median(r["seconds"] for r in steady),
        "median_slowest_train_seconds": statistics.median(r["slowest_train_seconds"] for r in steady),
        "median_overhead_seconds": statistics.median(r["overhead_seconds"] for r in steady),
        "min_overhead_seconds": min(r["overhead_seconds"] for r in steady),
        "max_overhead_seconds": max(r["overhead_seconds"] for r in steady),
        "median_aggregate_seconds": statistics.median(r["aggregate_seconds"] for r in steady),
        "superlink_cpu_seconds_per_round": status.get("superlink_cpu_seconds_per_round"),
        "nothing_lost": status.get("nothing_lost"),
        "memory": status.get("memory"),
        "requests_per_round": status.get("requests"),
        "requests": steady_rates(status["requests"]) if status.get("requests") else None,
        **{f"median_{part}_seconds": statistics.median(row[f"{part}_seconds"] for row in steady_rows) for part in ("deliver", "train", "return")},
    }


def _ratios(results: dict[str, dict[str, Any]], sizes) -> dict[str, float | None]:
    ratios = {}
    for holders in sizes:
        ours, baseline = results.get(f"ewtune/{holders}"), results.get(f"flower-defaults/{holders}")
        ratios[str(holders)] = (
            baseline["median_overhead_seconds"] / ours["median_overhead_seconds"]
            if ours and baseline and ours["median_overhead_seconds"] > 0 else None
        )
    return ratios


def _markdown(report: dict[str, Any]) -> str:
    before, after = report["machine_before"], report["machine_after"]
    lines = [
        "## Federation: coordination overhead per round (loopback, TLS + SuperNode authentication)",
        "",
        f"`{report['command']}`; {report['definition']}; target <= {report['target_seconds']:g} s with 3 holders "
        f"(goal <= {report['goal_seconds']:g} s). Medians over rounds 2 and later.",
        f"Load average before/after (1, 5, 15 min): {_load(before['load_average'])} / {_load(after['load_average'])} on {before['cpus']} CPUs.",
        "",
        "| configuration | holders | median round (s) | median slowest training (s) | median overhead (s) | min-max overhead (s) | median deliver / train / return per holder, aggregate (s) | SuperLink CPU per round (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in report["results"].values():
        lines.append(
            f"| {result['configuration']} | {result['holders']} | {result['median_round_seconds']:.2f} | {result['median_slowest_train_seconds']:.2f} | "
            f"**{result['median_overhead_seconds']:.2f}** | {result['min_overhead_seconds']:.2f}-{result['max_overhead_seconds']:.2f} | "
            + " / ".join(f"{result[f'median_{part}_seconds']:.2f}" for part in PARTS)
            + f" | {_optional(result.get('superlink_cpu_seconds_per_round'))} |"
        )
    lines.append("")
    for holders, ratio in report["ratios_flower_defaults_over_ewtune"].items():
        lines.append(f"- {holders} holders: flower-defaults / ewtune median overhead = " + (f"{ratio:.1f}x" if ratio else "n/a (not both measured)"))
    lines += [
        "",
        "deliver = coordinator reserve -> holder reserve (Flower's delivery, the ClientApp, the holder's evaluation of the "
        "incoming model, its plan and budget checks); train = holder reserve -> holder commit; return = holder commit -> "
        "coordinator commit (Flower's return path, receipt checks); aggregate = last reply -> end of round (commits, "
        "average, checkpoint). Times from the ledgers' timestamps and the coordinator's status.",
        "",
        *_per_holder_markdown(report["results"].values()),
    ]
    return "\n".join(lines) + "\n"


def _per_holder_markdown(results) -> list[str]:
    """The second table: per holder and round, what the federation's size costs, and that nothing was lost."""
    lines = [
        "#### Per holder and round, as holders are added (rounds 2 and later)",
        "",
        "| configuration | holders | nothing lost: rounds, replies accepted, training commits per holder (coordinator's / own ledger) "
        "| SuperLink CPU per holder and round (s) | Flower requests per holder and round: its own + its empty pulls "
        "| Runtime API requests (ServerApp, SuperExec) per holder and round (their empty pulls per round) | daemon RSS after round 1 -> last, max (MiB) "
        "| SuperNode RSS after round 1 -> last, max (MiB) | largest growth of one holder, daemon / SuperNode (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        lines.append(f"| {result['configuration']} | {result['holders']} | {_lost(result.get('nothing_lost'))} | "
                     f"{_per_holder_cpu(result)} | {_requests(result.get('requests'))} | {_memory(result.get('memory'))} |")
    lines += [
        "",
        "Requests are counted inside the SuperLink: `ewtune.bench.superlink_requests` puts one ASGI middleware outermost "
        "in flwr 1.42's SuperLink app, which records every HTTP request it serves (Fleet, Runtime and Control APIs on one "
        "port), the node id of a Fleet request (the one Flower's SuperNode authentication checks) and whether a pull found "
        "nothing (read from the response the client received). Every request passes that layer once, so the count is exact; "
        "a round's requests are those that arrived between its first train message push by the ServerApp and the next push. "
        "A holder's own requests exclude its empty message and object pulls, given apart; the Runtime API's are the "
        "ServerApp's (pushes, pulls of replies and objects, logs, heartbeats) and the SuperExec's task polls (1 a second). Memory is psutil's RSS of the "
        "holder's agent daemon and, summed, of the processes under it (the SuperNode and what it started), read after round 1 "
        "and after the last round. 30 holders need more than these 2 cores: run `ewtune bench federation --holders 30` on a "
        "lent 16-core machine (not measured yet).",
    ]
    return lines


def _lost(check: dict[str, Any] | None) -> str:
    if not check:
        return "n/a"
    commits = sorted({tuple(counts) for counts in check["ledger_commits"].values()})
    verdict = "**yes, nothing lost**" if check["complete"] else "**NO: something was lost**"
    return (f"{verdict}: {check['rounds_completed']} rounds, {check['replies_accepted']}/{check['replies_expected']} replies, "
            + ", ".join(f"{c}/{o}" for c, o in commits))


def _per_holder_cpu(result: dict[str, Any]) -> str:
    seconds = result.get("superlink_cpu_seconds_per_round")
    return "n/a" if seconds is None else f"{seconds / result['holders']:.3f}"


def _requests(rates: dict[str, Any] | None) -> str:
    if not rates or rates["holder_requests"] is None:
        return "n/a | n/a"
    return (f"{rates['holder_requests']:.1f} + {rates['holder_empty_pulls']:.1f} (one holder's round: {rates['holder_requests_min']}-"
            f"{rates['holder_requests_max']} in all) | {rates['coordinator_requests_per_holder']:.1f} ({rates['coordinator_empty_pulls']:.1f})")


def _memory(memory: dict[str, Any] | None) -> str:
    if not memory:
        return "n/a | n/a | n/a"
    daemon, supernode = memory["daemon"], memory["supernode"]
    return (f"{daemon['first_max_mib']:.0f} -> {daemon['last_max_mib']:.0f} | {supernode['first_max_mib']:.0f} -> {supernode['last_max_mib']:.0f} | "
            f"{daemon['growth_max_mib']:+.1f} / {supernode['growth_max_mib']:+.1f}")


def _optional(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f}"


def _load(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)
