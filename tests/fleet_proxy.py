"""deploy/nginx/ewtune-fleet.conf run with Debian's nginx in the foreground, as the tests need it: the deployed site
with only its addresses, ports and key directory replaced (every replaced text must still be in the file, so the
tests follow the deployed config), and a main configuration keeping nginx's files in one directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SITE = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "ewtune-fleet.conf"


def nginx_missing() -> str | None:
    """Why the proxy cannot run here, or None."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        return "nginx is not installed (scripts/setup installs Debian's nginx-light)"
    return None


def start_proxy(directory: Path, keys: Path, upstream_port: int, listen: tuple[str, int]) -> subprocess.Popen:
    """nginx serving the deployed site on ``listen`` (TLS with the SuperLink certificate in ``keys``) in front of
    127.0.0.1:``upstream_port``; returns once it accepts connections (from this network namespace)."""
    site = SITE.read_text()
    replacements = {
        "server 127.0.0.1:9092;": f"server 127.0.0.1:{upstream_port};",
        "listen 443 ssl;": f"listen {listen[0]}:{listen[1]} ssl;",
        "listen [::]:443 ssl;": "",
        "/etc/ewtune/coordinator-keys": str(keys),
    }
    for old, new in replacements.items():
        assert old in site, f"deploy/nginx/ewtune-fleet.conf no longer has {old!r}"
        site = site.replace(old, new)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "site.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""
    (directory / "nginx.conf").write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {directory}/nginx.pid;\nerror_log {directory}/error.log;\n"
        f"events {{}}\nhttp {{\n  access_log {directory}/access.log;\n  client_body_temp_path {directory}/body;\n"
        f"  proxy_temp_path {directory}/proxy;\n  fastcgi_temp_path {directory}/fastcgi;\n  uwsgi_temp_path {directory}/uwsgi;\n"
        f"  scgi_temp_path {directory}/scgi;\n  include {directory}/site.conf;\n}}\n"
    )
    nginx = subprocess.Popen(["nginx", "-p", str(directory), "-c", str(directory / "nginx.conf")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while True:
        if nginx.poll() is not None:
            raise RuntimeError(f"nginx exited: {nginx.stderr.read()} {(directory / 'error.log').read_text(errors='replace')}")
        try:
            socket.create_connection(listen, timeout=1).close()
            return nginx
        except OSError:
            if time.monotonic() > deadline:
                nginx.kill()
                raise RuntimeError(f"nginx did not listen on {listen[0]}:{listen[1]}")
            time.sleep(0.1)
