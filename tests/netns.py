"""Network namespaces for the multi-host test: one for the coordinator and one per holder, joined by a bridge in the
coordinator's namespace, with addresses that exist inside those namespaces only (nothing is added to the host's
own network). Needs root and iproute2's ``ip``; :func:`unavailable` says why they cannot be made here."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

SUBNET = "10.77.0"  # inside the namespaces only


def unavailable() -> str | None:
    """Why network namespaces cannot be made on this machine, or None."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (scripts/setup installs it)"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"ewt-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Namespaces:
    """``with Namespaces(["h0", "h1"]) as spaces``: ``spaces.coordinator`` at ``SUBNET.1``, ``spaces.holders[h]``
    at ``SUBNET.2``, ``.3``, ...; all deleted (with their links) on exit."""

    def __init__(self, holders: list[str]):
        suffix = secrets.token_hex(3)
        self.coordinator = f"ewt-c-{suffix}"
        self.holders = {holder: f"ewt-{holder}-{suffix}" for holder in holders}
        self.coordinator_address = f"{SUBNET}.1"
        self.addresses = {holder: f"{SUBNET}.{index + 2}" for index, holder in enumerate(holders)}

    def __enter__(self) -> "Namespaces":
        try:
            self._make()
        except BaseException:
            self._delete()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._delete()

    def exec_prefix(self, namespace: str) -> list[str]:
        return ["ip", "netns", "exec", namespace]

    def _make(self) -> None:
        coordinator = self.coordinator
        _ip("netns", "add", coordinator)
        _ip("-n", coordinator, "link", "set", "lo", "up")
        _ip("-n", coordinator, "link", "add", "br0", "type", "bridge")
        _ip("-n", coordinator, "addr", "add", f"{self.coordinator_address}/24", "dev", "br0")
        _ip("-n", coordinator, "link", "set", "br0", "up")
        for index, (holder, namespace) in enumerate(self.holders.items()):
            _ip("netns", "add", namespace)
            _ip("-n", namespace, "link", "set", "lo", "up")
            port = f"v{index}"
            _ip("-n", coordinator, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            _ip("-n", coordinator, "link", "set", port, "master", "br0")
            _ip("-n", coordinator, "link", "set", port, "up")
            _ip("-n", namespace, "addr", "add", f"{self.addresses[holder]}/24", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")

    def _delete(self) -> None:
        for namespace in (self.coordinator, *self.holders.values()):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _ip(*arguments: str) -> None:
    result = subprocess.run(["ip", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(arguments)}: {result.stderr.strip()}")
