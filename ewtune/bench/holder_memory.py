"""Each holder's resident memory, read at every round of ``ewtune bench federation``: its agent daemon, and its
SuperNode with whatever the SuperNode started (the warm task loop runs inside it; Flower's own SuperNode
starts ``flower-superexec`` and a ClientApp process per message), so that the first and the last round can be
compared: memory that grows with rounds would show as the difference."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import psutil

MIB = 2**20


def resident_bytes(daemon_pid: int) -> dict[str, int]:
    """{daemon: its RSS, supernode: the summed RSS of the processes it started, at any depth}; a child that
    exits while it is read counts for nothing (Flower's ClientApp processes come and go)."""
    daemon = psutil.Process(daemon_pid)
    children = 0
    for child in daemon.children(recursive=True):
        try:
            children += child.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return {"daemon": daemon.memory_info().rss, "supernode": children}


class HolderMemory:
    """:func:`resident_bytes` of every holder at each status update, kept once per number of completed rounds
    (the first reading after each round ends), as :class:`ewtune.bench.federation.SuperLinkCpu` keeps CPU time."""

    def __init__(self, daemon_pids: Mapping[str, int]):
        self.daemon_pids = dict(daemon_pids)
        self.at_rounds: dict[int, dict[str, dict[str, int]]] = {}  # rounds completed -> holder -> resident bytes

    def on_status(self, status: dict[str, Any]) -> None:
        rounds = len(status.get("rounds", []))
        if rounds not in self.at_rounds:
            self.at_rounds[rounds] = {holder: resident_bytes(pid) for holder, pid in self.daemon_pids.items()}

    def first_and_last(self) -> dict[str, Any] | None:
        """After round 1 and after the last round read: each holder's MiB then, and over the holders the
        largest and the median of each process's resident memory and the largest growth; None before two rounds."""
        rounds = sorted(r for r in self.at_rounds if r >= 1)
        if len(rounds) < 2:
            return None
        first, last = self.at_rounds[rounds[0]], self.at_rounds[rounds[-1]]
        summary: dict[str, Any] = {"first_round": rounds[0], "last_round": rounds[-1], "holders": {}}
        for holder in self.daemon_pids:
            summary["holders"][holder] = {part: [first[holder][part] / MIB, last[holder][part] / MIB] for part in ("daemon", "supernode")}
        for part in ("daemon", "supernode"):
            pairs = [cells[part] for cells in summary["holders"].values()]
            summary[part] = {
                "first_max_mib": max(before for before, _ in pairs), "last_max_mib": max(after for _, after in pairs),
                "first_median_mib": statistics.median(before for before, _ in pairs),
                "last_median_mib": statistics.median(after for _, after in pairs),
                "growth_max_mib": max(after - before for before, after in pairs),
            }
        return summary

