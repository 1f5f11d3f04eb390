"""The coordinator's read-only status page: GET only (405 otherwise), loopback unless TLS, and in a real
headless Chromium: it loads, shows the holders and updates after a round, first against a status file
rewritten by the test, then against a live federation (real Flower processes, two holders, two rounds).

The live run takes about 60 to 90 s on 2 cores (the daemons and SuperNodes start)."""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.request

import pytest
from browser import chromium_page
from playwright.sync_api import expect

from ewtune.accountant.errors import InvalidInputError
from ewtune.coordinator.status_server import StatusServer
from tiny_federation import MINIMAL_FEDERATION_TOML


def status(round_: int, state: str = "running") -> dict:
    holders = {
        name: {"active": True, "dataset_size": 500, "noise_multiplier": 1.1, "budget_epsilon": 8.0,
               "epsilon_certified": 1.5 * round_, "epsilon_edgeworth_estimate": 1.4 * round_,
               "rounds_committed": round_, "accuracy": {}}
        for name in ("bank-b", "hospital-a")
    }  # fmt: skip
    rounds = [{"round": r, "seconds": 2.0, "holders": {h: {"status": "committed"} for h in holders}} for r in range(1, round_ + 1)]
    return {"run_id": "demo-7", "state": state, "rounds_planned": 3, "rounds_completed": round_, "holders": holders,
            "rounds": rounds, "skipped": {"clinic-c": "budget too small"}, "elapsed_seconds": 10.0 * round_}


def write(path, document) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(document))
    os.replace(partial, path)  # as the ServerApp writes it


def request(url: str, method: str = "GET", context=None) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_read_only_endpoints(tmp_path):
    path = tmp_path / "status.json"
    with StatusServer(path) as page:
        assert page.url.startswith("http://127.0.0.1:")
        assert json.loads(request(page.url + "status.json")[2]) == {"state": "waiting"}
        write(path, status(1))
        code, headers, body = request(page.url + "status.json")
        assert code == 200 and json.loads(body) == status(1)
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert request(page.url)[0] == 200 and request(page.url + "status.js")[0] == 200
        assert request(page.url + "ledger.jsonl")[0] == 404
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            code, headers, _ = request(page.url + "status.json", method)
            assert code == 405 and headers["Allow"] == "GET, HEAD"
        assert json.loads(path.read_text()) == status(1)


def test_exposed_only_with_tls(tmp_path):
    from ewtune.coordinator.credentials import init_credentials

    with pytest.raises(InvalidInputError, match="only with TLS"):
        StatusServer(tmp_path / "status.json", host="0.0.0.0")
    credentials = init_credentials(tmp_path / "keys")
    write(tmp_path / "status.json", status(2))
    with StatusServer(tmp_path / "status.json", certificate=credentials.server_certificate, key=credentials.server_key) as page:
        assert page.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(credentials.ca_certificate))
        assert json.loads(request(page.url + "status.json", context=trusted)[2])["rounds_completed"] == 2
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            request(page.url + "status.json", context=ssl.create_default_context())


def holder_rows(page) -> dict[str, list[str]]:
    """The holder table as shown (read through locators: the page's Content-Security-Policy forbids eval, so
    the test runs no script in it and the page is tested under its own policy)."""
    rows = {}
    for row in page.locator("#holders tbody tr").all():
        rows[row.get_attribute("data-holder")] = row.locator("td").all_text_contents()
    return rows


def wait_for_text(page, selector: str, text: str, timeout: float) -> None:
    expect(page.locator(selector)).to_have_text(text, timeout=timeout * 1000)


def test_the_page_shows_the_holders_and_follows_the_rounds_in_chromium(tmp_path):
    path = tmp_path / "status.json"
    write(path, status(1))
    with StatusServer(path) as server, chromium_page() as page:
        page.goto(server.url)
        wait_for_text(page, "#round", "1/3", 10)
        rows = holder_rows(page)
        assert set(rows) == {"bank-b", "hospital-a", "clinic-c"}
        assert rows["bank-b"][1:2] == ["active"] and rows["bank-b"][4] == "1.500" and rows["bank-b"][7] == "6.500"
        assert rows["clinic-c"][1] == "skipped: budget too small"
        write(path, status(2))
        wait_for_text(page, "#round", "2/3", 10)
        assert holder_rows(page)["hospital-a"][4] == "3.000"
        assert page.locator("#events li").first.text_content().startswith("round 2: 2 update(s) verified")


def test_the_page_follows_a_live_federation_in_chromium(tiny_pooled_dir, mr_csv, tmp_path):
    from ewtune.local_federation import FederationJob, HolderSetup, LocalFederation, initial_weights, partition_csv

    names = ["h0", "h1"]
    partitions = partition_csv(mr_csv, tmp_path / "data", len(names), names)
    training = {"model_dir": str(tiny_pooled_dir), "max_length": 24, "mode": "head", "physical_batch_size": 32, "eval_fraction": 0.2}
    holders = [HolderSetup(name, path, budget_epsilon=8.0, training=training) for name, path in zip(names, partitions)]
    job = FederationJob(
        federation={
            "name": "live", "rounds": 2, "local_steps": 2, "expected_batch_size": 16, "clip_norm": 1.0, "learning_rate": 0.1,
            "target_epsilon": 8.0, "delta": 1e-5, "min_holders": 2, "expected_holders": 2, "max_noise_multiplier": 10.0,
        },
        model={"initial_weights": str(initial_weights(tiny_pooled_dir, tmp_path / "initial.safetensors", training)),
               "base_model_dir": str(tiny_pooled_dir), "mode": "head"},
        timeouts={"nodes": 240, "query": 120, "round": 300, "evaluate": 120},
    )  # fmt: skip
    with LocalFederation(tmp_path / "work", holders) as federation, \
            StatusServer(tmp_path / "work" / "coordinator" / "run" / "status.json") as server, chromium_page() as page:
        federation.start()
        page.goto(server.url)  # before the run: the page waits for it
        wait_for_text(page, "#state", "waiting", 10)
        federation.wait_for_daemons()
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(federation.run(job, timeout=600)))
        runner.start()
        try:
            expect(page.locator("#holders tbody tr")).to_have_count(2, timeout=300_000)
            assert set(holder_rows(page)) == {"h0", "h1"}
            seen = []  # every value the round counter shows from now on, without a reload
            deadline = time.monotonic() + 300
            while page.locator("#state").text_content() != "finished" and time.monotonic() < deadline:
                seen.append(page.locator("#round").text_content())
                time.sleep(0.25)
            seen = list(dict.fromkeys(seen + [page.locator("#round").text_content()]))
            rows = holder_rows(page)
        finally:
            runner.join(timeout=600)
    assert result["state"] == "finished"
    assert seen[0] in ("0/2", "1/2") and seen[-1] == "2/2", seen  # it updated after a round
    for name in names:
        assert rows[name][1] == "active" and rows[name][9] == "2"
        assert float(rows[name][4]) == pytest.approx(result["holders"][name]["epsilon_certified"], abs=5e-4)
        assert float(rows[name][4]) > 0


@pytest.fixture
def exposed(tmp_path):
    """The page bound to every address (off loopback: TLS and a token), reached over 127.0.0.1."""
    from ewtune.coordinator.credentials import init_credentials
    from ewtune.coordinator.status_server import status_token

    credentials = init_credentials(tmp_path / "keys")
    write(tmp_path / "status.json", status(2))
    token = status_token(tmp_path / "status-token")
    tls = {"certificate": credentials.server_certificate, "key": credentials.server_key}
    with StatusServer(tmp_path / "status.json", host="0.0.0.0", token=token, **tls) as page:
        port = page.url.rsplit(":", 1)[1].strip("/")
        yield f"https://127.0.0.1:{port}/", token, ssl.create_default_context(cafile=str(credentials.ca_certificate))


def authorised(url: str, context, authorization: str | None) -> tuple[int, dict, bytes]:
    headers = {"Authorization": authorization} if authorization else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_off_loopback_every_request_needs_the_token(exposed, tmp_path):
    import base64

    url, token, context = exposed
    assert (tmp_path / "status-token").stat().st_mode & 0o777 == 0o600
    for path in ("", "status.json", "status.js"):
        code, headers, body = authorised(url + path, context, None)
        assert code == 401 and headers["WWW-Authenticate"].startswith("Basic") and b"rounds" not in body
    assert authorised(url + "status.json", context, "Bearer " + token[:-1] + "x")[0] == 401
    assert authorised(url + "status.json", context, "Basic " + base64.b64encode(b"anyone:guess").decode())[0] == 401
    code, _, body = authorised(url + "status.json", context, "Bearer " + token)
    assert code == 200 and json.loads(body)["rounds_completed"] == 2
    basic = "Basic " + base64.b64encode(f"operator:{token}".encode()).decode()  # what a browser sends once asked
    assert authorised(url, context, basic)[0] == 200


def test_off_loopback_the_page_is_refused_without_a_token_or_tls(tmp_path):
    from ewtune.coordinator.credentials import init_credentials

    credentials = init_credentials(tmp_path / "keys")
    with pytest.raises(InvalidInputError, match="a token"):
        StatusServer(tmp_path / "status.json", host="0.0.0.0", certificate=credentials.server_certificate, key=credentials.server_key)
    with pytest.raises(InvalidInputError, match="only with TLS"):
        StatusServer(tmp_path / "status.json", host="0.0.0.0", token="a token")


def test_the_token_file_is_made_private_once_and_then_read(tmp_path):
    from ewtune.coordinator.status_server import status_token

    path = tmp_path / "run" / "status-token"
    first = status_token(path)
    assert len(first) >= 40 and path.stat().st_mode & 0o777 == 0o600
    assert status_token(path) == first
    path.write_text("")
    with pytest.raises(InvalidInputError, match="is empty"):
        status_token(path)


def test_idle_connections_beyond_the_limit_cannot_starve_a_request(exposed):
    """More idle TLS connections than the limit (none starts its handshake): a request gets an answer or a
    quick refusal, never a wait; once the idle ones pass their deadline it is answered again while their
    clients still hold them open."""
    import socket

    from ewtune.coordinator.status_server import CONNECTION_DEADLINE_S, MAX_CONNECTIONS

    url, token, context = exposed
    port = int(url.rsplit(":", 1)[1].strip("/"))
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS + 8)]
    try:
        time.sleep(0.3)
        started = time.monotonic()
        try:
            outcome = authorised(url + "status.json", context, "Bearer " + token)[0]
        except (urllib.error.URLError, ConnectionError, ssl.SSLError) as refused:
            outcome = f"refused: {refused}"
        assert time.monotonic() - started < 2.0, outcome  # answered or refused at once, not left waiting
        time.sleep(CONNECTION_DEADLINE_S + 0.5)
        started = time.monotonic()
        assert authorised(url + "status.json", context, "Bearer " + token)[0] == 200
        assert time.monotonic() - started < 2.0
        for connection in idle:  # the server hung up on every one of them
            connection.settimeout(2.0)
            assert connection.recv(1) == b""
    finally:
        for connection in idle:
            connection.close()


def test_a_request_sent_a_byte_at_a_time_is_cut_at_the_deadline(tmp_path):
    """Slowloris: a request line dribbled one byte every 0.2 s keeps its connection no longer than the deadline."""
    import socket

    from ewtune.coordinator.status_server import CONNECTION_DEADLINE_S

    with StatusServer(tmp_path / "status.json") as page:
        port = int(page.url.rsplit(":", 1)[1].strip("/"))
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.settimeout(0.2)
            cut = None
            for byte in b"GET /status.json HTTP/1.0\r\nX-Slow: " + b"x" * 200:
                try:
                    slow.sendall(bytes([byte]))
                    if slow.recv(1) == b"":
                        cut = time.monotonic() - started
                        break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    cut = time.monotonic() - started
                    break
        assert cut is not None and CONNECTION_DEADLINE_S - 0.5 < cut < CONNECTION_DEADLINE_S + 1.5, cut
        assert request(page.url + "status.json")[0] == 200




def test_serve_status_off_loopback_makes_a_private_token_and_requires_it(tmp_path):
    import subprocess
    import sys

    from ewtune.coordinator.credentials import init_credentials
    from ewtune.local_federation import free_port

    credentials = init_credentials(tmp_path / "keys")
    (tmp_path / "federation.toml").write_text(MINIMAL_FEDERATION_TOML)
    serve = [sys.executable, "-m", "ewtune", "coordinator", "serve-status", "--config", str(tmp_path / "federation.toml"), "--host", "0.0.0.0"]
    refused = subprocess.run([*serve, "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "only with TLS" in refused.stderr and "Traceback" not in refused.stderr
    port = free_port()
    process = subprocess.Popen([*serve, "--port", str(port), "--credentials", str(tmp_path / "keys")], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        token_file = tmp_path / "out" / "status-token"
        assert f"token in {token_file}" in line and token_file.stat().st_mode & 0o777 == 0o600
        assert token_file.read_text().strip() not in line  # the token itself is never printed
        context = ssl.create_default_context(cafile=str(credentials.ca_certificate))
        url = f"https://127.0.0.1:{port}/status.json"
        assert authorised(url, context, None)[0] == 401
        code, _, body = authorised(url, context, "Bearer " + token_file.read_text().strip())
        assert code == 200 and json.loads(body) == {"state": "waiting"}
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_page_shows_why_a_holder_sent_no_evaluation_in_chromium(tmp_path):
    """A holder whose policy refuses evaluation: the accuracy cell gives its reason per round, not a bare "-"."""
    document = status(2)
    document["holders"]["bank-b"]["evaluation_missing"] = {
        "0": "refused: this holder releases no evaluation metrics", "1": "refused: this holder releases no evaluation metrics"}
    document["holders"]["hospital-a"].update(accuracy={"0": 0.5}, evaluation_missing={"1": "no reply within the timeout"})
    path = tmp_path / "status.json"
    write(path, document)
    with StatusServer(path) as server, chromium_page() as page:
        page.goto(server.url)
        wait_for_text(page, "#round", "2/3", 10)
        rows = holder_rows(page)
        assert rows["bank-b"][-1] == "no evaluation of rounds 0, 1: refused: this holder releases no evaluation metrics"
        assert rows["hospital-a"][-1] == "0: 0.500; no evaluation of round 1: no reply within the timeout"
        assert rows["clinic-c"][-1] == "-"


def test_the_page_shows_a_causal_lms_released_perplexity_in_chromium(tmp_path):
    """A causal LM's holders release a (noised) perplexity, not an accuracy: the cell shows it per round."""
    document = status(2)
    document["holders"]["hospital-a"].update(perplexity={"0": 148.04, "2": 137.4, "1": 145.3}, evaluation={})
    path = tmp_path / "status.json"
    write(path, document)
    with StatusServer(path) as server, chromium_page() as page:
        page.goto(server.url)
        wait_for_text(page, "#round", "2/3", 10)
        assert holder_rows(page)["hospital-a"][-1] == "0: ppl 148.0; 1: ppl 145.3; 2: ppl 137.4"
