"""The coordinator's side of the multi-host test (tests/test_multihost.py), run inside the coordinator's network
namespace: ``ip netns exec NS python tests/netns_coordinator.py SPEC.json RESULT.json``.

It is :class:`ewtune.local_federation.LocalFederation` with three changes: the SuperLink's certificate also names
the coordinator's bridge address; nginx with deploy/nginx/ewtune-fleet.conf listens there (TLS) in front of the
SuperLink, which stays on this namespace's 127.0.0.1; each holder's agent daemon (and the SuperNode it supervises)
runs in the holder's own namespace and dials the proxy. After the run it probes the network from a holder's
namespace (the SuperLink's port, the Control API through the proxy) and writes the status and the probes to
RESULT.json."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import tomli_w
from fleet_proxy import start_proxy

import ewtune.coordinator.credentials
import ewtune.local_federation
from ewtune.local_federation import FederationJob, HolderSetup, LocalFederation

PROBE = """
import http.client, socket, ssl, sys
address, proxy_port, superlink_port, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
try:
    socket.create_connection((address, superlink_port), timeout=5).close()
    direct = "connected"
except OSError as failure:
    direct = type(failure).__name__
connection = http.client.HTTPSConnection(address, proxy_port, context=ssl.create_default_context(cafile=ca), timeout=10)
connection.request("GET", "/v1/control/list-runs")
print(direct, connection.getresponse().status)
"""


class NamespacedFederation(LocalFederation):
    def __init__(self, work_dir: Path, holders: list[HolderSetup], namespaces: dict[str, str], proxy: tuple[str, int]):
        super().__init__(work_dir, holders, log=lambda text: print(text, flush=True))
        self.namespaces, self.proxy = namespaces, proxy
        self.nginx: subprocess.Popen | None = None

    def start_superlink(self) -> None:
        super().start_superlink()
        keys = self.credentials.directory
        self.nginx = start_proxy(self.work_dir / "coordinator" / "nginx", keys, self.port, self.proxy)

    def agent_toml(self, holder: HolderSetup) -> Path:
        """The holder dials the proxy's address, the only one its namespace can reach."""
        path = super().agent_toml(holder)
        document = tomllib.loads(path.read_text())
        document["supernode"]["superlink"] = f"{self.proxy[0]}:{self.proxy[1]}"
        path.write_text(tomli_w.dumps(document))
        return path

    def _spawn(self, name, command, log_path, environment, cwd):
        role, _, holder_id = name.partition(":")
        if role == "agent":
            command = ["ip", "netns", "exec", self.namespaces[holder_id], *command]
        return super()._spawn(name, command, log_path, environment, cwd)

    def probe_from(self, holder_id: str) -> tuple[str, int]:
        """(what a direct connection to the SuperLink's port gives, the proxy's HTTP status for the Control API),
        both from ``holder_id``'s namespace."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.namespaces[holder_id], sys.executable, "-c", PROBE,
             self.proxy[0], str(self.proxy[1]), str(self.port), str(self.credentials.ca_certificate)],
            capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"probe from {holder_id} failed: {result.stderr.strip()[-500:]}")
        direct, status = result.stdout.split()
        return direct, int(status)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.nginx is not None:
                self.nginx.terminate()
                self.nginx.wait(timeout=10)


def main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    proxy = (spec["proxy"][0], int(spec["proxy"][1]))
    # The SuperLink certificate (which the proxy presents) also names the address the holders dial.
    # (patched where LocalFederation looks it up: ewtune.local_federation imports the function by name)
    ewtune.local_federation.init_credentials = functools.partial(
        ewtune.coordinator.credentials.init_credentials, addresses=("127.0.0.1", "localhost", proxy[0])
    )
    holders = [HolderSetup(h["holder_id"], Path(h["data_file"]), training=h["training"]) for h in spec["holders"]]
    job = FederationJob(**spec["job"])
    with NamespacedFederation(Path(spec["work_dir"]), holders, spec["namespaces"], proxy) as federation:
        federation.start()
        federation.wait_for_daemons()
        status = federation.run(job, timeout=600)
        probes = {holder.holder_id: federation.probe_from(holder.holder_id) for holder in holders}
        result = {"status": status, "probes": probes, "superlink_port": federation.port,
                  "access_log": str(federation.work_dir / "coordinator" / "nginx" / "access.log")}
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
