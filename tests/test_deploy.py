"""deploy/ validated without a container engine or a cluster: the systemd units with `systemd-analyze verify`,
the compose file against the compose-spec schema (check-jsonschema's vendored copy), the Kubernetes
manifests with kubernetes-validate (strict), and the Fleet proxy (deploy/nginx/ewtune-fleet.conf) run with
Debian's nginx on loopback in front of a TLS stand-in for the SuperLink: the Fleet API passes, TLS end to
end, and the Control API is refused. The images themselves are not built here."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fleet_proxy import nginx_missing, start_proxy

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent


def _units():
    return sorted(DEPLOY.glob("*.service"))


def test_deploy_has_a_unit_per_process():
    assert [unit.name for unit in _units()] == [
        "ewtune-agent.service", "ewtune-coordinator.service", "ewtune-supernode.service",
    ]


@pytest.mark.parametrize("unit", _units(), ids=lambda unit: unit.name)
def test_each_systemd_unit_is_hardened(unit):
    text = unit.read_text()
    for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "CapabilityBoundingSet=\n",
                      "RestrictSUIDSGID=yes", "User=ewtune-"):
        assert directive in text, f"{unit.name} lacks {directive}"
    assert "RestrictAddressFamilies=" in text or "PrivateNetwork=yes" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed on this machine")
def test_the_systemd_units_verify(tmp_path):
    """`systemd-analyze verify` on the three units together (the SuperNode's requires the daemon's), the
    executables they name pointed at this checkout's virtual environment; a warning counts as a failure."""
    copies = []
    for unit in _units():
        copies.append(tmp_path / unit.name)
        copies[-1].write_text(unit.read_text().replace("/opt/ewtune/.venv/bin", str(VENV_BIN)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, copies)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_the_compose_file_matches_the_compose_specification():
    result = subprocess.run(
        [str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "docker/compose.yaml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_file_keeps_the_control_api_on_the_proxys_loopback():
    import yaml

    services = yaml.safe_load((DEPLOY / "docker/compose.yaml").read_text())["services"]
    assert services["coordinator"]["network_mode"] == "service:superlink-proxy"
    assert "ports" not in services["coordinator"]
    assert all(services[name]["network_mode"] == "none" for name in services if name.endswith("-agent"))
    assert all(services[name]["user"] == "ewtune-flower" for name in services if name.endswith("-supernode"))


def test_the_kubernetes_manifests_validate_strictly():
    manifests = sorted(str(path) for path in (DEPLOY / "k8s").glob("*.yaml"))
    assert len(manifests) == 2
    result = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "--strict", "--quiet", *manifests],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_manifest_is_refused(tmp_path):
    """The validator can fail: a Deployment with a misspelt field does not pass."""
    broken = (DEPLOY / "k8s/agent.yaml").read_text().replace("replicas: 1", "replica: 1")
    (tmp_path / "agent.yaml").write_text(broken)
    result = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "--strict", "--quiet", str(tmp_path / "agent.yaml")],
                            capture_output=True, text=True)
    assert result.returncode != 0


# --- the Fleet proxy ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _SuperLinkStandIn(BaseHTTPRequestHandler):
    """Answers every request with the path it received; it serves TLS only, so an answer proves the hop
    from the proxy was TLS."""

    seen: list[str] = []

    def _answer(self):
        self.seen.append(self.path)
        length = int(self.headers.get("Content-Length", 0))
        self.rfile.read(length)
        body = f"superlink got {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def fleet_proxy(tmp_path):
    if nginx_missing():
        pytest.skip(nginx_missing())
    from ewtune.coordinator.credentials import init_credentials

    credentials = init_credentials(tmp_path / "keys", ["127.0.0.1", "localhost"])
    upstream_port, proxy_port = _free_port(), _free_port()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(credentials.server_certificate, credentials.server_key)
    _SuperLinkStandIn.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", upstream_port), _SuperLinkStandIn)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    try:
        nginx = start_proxy(tmp_path / "nginx", tmp_path / "keys", upstream_port, ("127.0.0.1", proxy_port))
    except RuntimeError as failure:
        server.shutdown()
        pytest.fail(str(failure))
    try:
        client = ssl.create_default_context(cafile=str(credentials.ca_certificate))
        yield proxy_port, client
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)
        server.shutdown()


def _request(proxy, method, path):
    port, context = proxy
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=10)
    try:
        connection.request(method, path, body=b"{}")
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_the_proxy_passes_the_fleet_api_over_tls_and_refuses_the_control_api(fleet_proxy):
    status, body = _request(fleet_proxy, "POST", "/v1/fleet/pull-messages")
    assert (status, body) == (200, "superlink got /v1/fleet/pull-messages")
    for method, path in (("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-supernode"),
                         ("GET", "/v1/control/list-runs"), ("GET", "/"), ("POST", "/v1/fleetx/anything")):
        assert _request(fleet_proxy, method, path)[0] == 403, path
    assert _SuperLinkStandIn.seen == ["/v1/fleet/pull-messages"]


def test_the_proxy_refuses_a_client_that_does_not_trust_the_federation_ca(fleet_proxy):
    port, _ = fleet_proxy
    with pytest.raises(ssl.SSLCertVerificationError):
        _request((port, ssl.create_default_context()), "POST", "/v1/fleet/pull-messages")
