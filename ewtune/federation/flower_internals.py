"""Every use of Flower internals, in one place: the shorter waits on the message path, the warm task loop, and
the SuperLink's patience with its own database.

flwr 1.42 pays fixed sleeps on every round's path, none of which a flag or variable sets:

- the SuperNode only pulls; a pull that finds nothing sleeps 3 s (``start_client_internal``'s main loop), and
  waiting for the ClientApp's reply and its objects it sleeps 0.5 s at a time;
- a reply's header reaches the ServerApp before its objects, and ``pull_objects`` then backs off 1 s, doubling;
- ``flwr-clientapp`` serves one message and exits, so every message pays a fresh process and flwr's imports;
- the SuperLink's SQLite waits 5 s for a lock (``busy_timeout``), then fails the request (see
  :func:`patient_superlink_database`).

This module rebinds module attributes of the pinned flwr at process start (nothing of Flower is copied or
forked) and runs the ClientApp task loop against the SuperNode's Runtime API (``--isolation process``) in a
process that stays warm. :func:`check_flower_internals` runs first and refuses a flwr whose version or
internal names differ from those these patches were written against, so that an upgrade fails loudly at
start-up instead of silently losing the waits or, worse, mis-serving a task.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable

from ewtune.accountant.errors import EwtuneError

log = logging.getLogger(__name__)

PINNED_FLWR_VERSION = "1.42.0"

# module -> the names these patches read or rebind in it.
REQUIRED_INTERNALS: dict[str, tuple[str, ...]] = {
    "flwr.supernode.start_client_internal": ("time", "_pull_and_store_message", "pull_objects", "start_client_internal"),
    "flwr.superlink.grid.http_grid": ("pull_objects",),
    "flwr.supernode.runtime.run_clientapp": ("pull_task_input", "push_message", "push_task_output", "pull_and_inflate_object_from_tree"),
    "flwr.supercore.runtime": ("RuntimeHttpClient",),
    "flwr.supercore.heartbeat": ("HeartbeatSender",),
    "flwr.supercore.interceptors": ("RuntimeTokenHttpInterceptor", "RuntimeVersionHttpInterceptor", "SuperExecAuthHttpInterceptor"),
    "flwr.supercore.retry": ("make_simple_http_retry_invoker",),
    "flwr.proto.runtime_pb2": ("AcquireTaskRequest", "SendTaskHeartbeatRequest"),
    "flwr.supercore.constant": ("TaskType",),
    "flwr.supercore.run": ("RunNotRunningException",),
    "flwr.common.constant": ("ErrorCode", "SubStatus"),
    "flwr.supernode.cli": ("flower_supernode",),
    "flwr.supercore.sql_mixin": ("SQLITE_PRAGMAS", "_set_sqlite_pragmas"),
    "flwr.superlink.cli": ("flower_superlink",),
}

FAST_POLL_S = 0.1  # the SuperNode's first pull interval after a message (flwr: 3 s always) ...
POLL_GROWTH = 1.5  # ... each empty pull waits this much longer than the one before ...
SLOW_POLL_S = 1.0  # ... up to this, while the run is active
REPLY_WAIT_S = 0.02  # the SuperNode's wait for a reply or an object (flwr: 0.5 s)
ACTIVE_WINDOW_S = 120.0  # a node that saw a message within this window polls fast; afterwards as flwr does
OBJECT_BACKOFF_S, OBJECT_BACKOFF_CAP_S = 0.05, 0.5  # pull_objects' first retry and cap (flwr: 1 s and 10 s)
ACQUIRE_TASK_METHOD = "/flwr.proto.Runtime/AcquireTask"  # the one Runtime call flwr 1.42 signs with the SuperExec secret
SUPERLINK_BUSY_TIMEOUT_MS = 120_000  # how long the SuperLink's SQLite waits for a lock (flwr: 5000)


class FlowerInternalsError(EwtuneError):
    """The installed flwr is not the one whose internals this module patches."""


def check_flower_internals(version: str | None = None) -> None:
    """Refuse to patch anything unless flwr is the pinned version and every internal name is present."""
    installed = version if version is not None else importlib.metadata.version("flwr")
    problems = [] if installed == PINNED_FLWR_VERSION else [f"flwr {installed} is installed, {PINNED_FLWR_VERSION} is pinned"]
    for module_name, names in REQUIRED_INTERNALS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as missing:
            problems.append(f"{module_name} does not import ({missing})")
            continue
        problems += [f"{module_name}.{name} is missing" for name in names if not hasattr(module, name)]
    if problems:
        raise FlowerInternalsError(
            "refusing to run on Flower internals that differ from those ewtune was written against: " + "; ".join(problems)
        )


class ActivePolling:
    """Stands in for the ``time`` module inside flwr's ``start_client_internal``, whose only use of it is
    ``time.sleep``. Within :data:`ACTIVE_WINDOW_S` of the last message, the idle pull's 3 s becomes a backoff:
    :data:`FAST_POLL_S` after a message, each empty pull :data:`POLL_GROWTH` times longer than the one before,
    up to :data:`SLOW_POLL_S`; an idle node polls every 3 s as flwr does. The 0.5 s reply and object waits
    become :data:`REPLY_WAIT_S`. Every other attribute is the real ``time`` module's.

    Why a backoff and not one short interval: every pull of every holder is a signed TLS request that the one
    SuperLink serves, and most pulls of a round find nothing (a holder that has replied waits for the slowest
    holder and the aggregation). At a fixed 0.2 s, ten holders sent the SuperLink 50 pulls a second whatever
    the round's length; with the backoff a holder pulls often just after its reply, when the next message may
    come soon (it was the slowest), and about once a second in a long wait, so the pulls per round grow with
    the log of the round's length, not with it, and the delay added to a message is at most about half the
    time already waited (never more than :data:`SLOW_POLL_S`)."""

    IDLE_SLEEP_S = 3  # the value flwr 1.42 passes for its idle pull

    def __init__(self, fast_poll: float = FAST_POLL_S, reply_wait: float = REPLY_WAIT_S, active_window: float = ACTIVE_WINDOW_S,
                 growth: float = POLL_GROWTH, slow_poll: float = SLOW_POLL_S):
        self.fast_poll, self.reply_wait, self.active_window = fast_poll, reply_wait, active_window
        self.growth, self.slow_poll = growth, slow_poll
        self.last_message = float("-inf")
        self.empty_pulls = 0  # idle sleeps since the last message
        self.arrived = threading.Event()  # set when a message was stored: wakes the task loop (WarmTaskLoop)

    def message_seen(self) -> None:
        self.last_message = time.monotonic()
        self.empty_pulls = 0
        self.arrived.set()

    def interval(self, requested: float) -> float:
        """What a ``time.sleep(requested)`` of the SuperNode sleeps now."""
        if requested < self.IDLE_SLEEP_S:
            return min(requested, self.reply_wait)
        if time.monotonic() - self.last_message >= self.active_window:
            return requested
        return min(self.slow_poll, self.fast_poll * self.growth ** min(self.empty_pulls, 64))  # no overflow on a long wait

    def sleep(self, seconds: float) -> None:
        interval = self.interval(seconds)
        if seconds >= self.IDLE_SLEEP_S:
            self.empty_pulls += 1
        time.sleep(interval)

    def __getattr__(self, name: str):
        return getattr(time, name)


def shorten_supernode_waits(polling: ActivePolling | None = None) -> ActivePolling:
    """Rebind the SuperNode's sleeps and object backoff (call before flwr's ``flower_supernode`` starts)."""
    check_flower_internals()
    # flwr internals: imported once check_flower_internals() accepted this flwr (module docstring)
    from flwr.supernode import start_client_internal as node

    polling = polling or ActivePolling()
    pull_and_store = node._pull_and_store_message

    @functools.wraps(pull_and_store)
    def pull_and_store_noting_activity(*args, **kwargs):
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            polling.message_seen()
        return run_id

    node.time = polling
    node._pull_and_store_message = pull_and_store_noting_activity
    node.pull_objects = _releasing_ended_runs(_short_backoff(node.pull_objects))
    return polling


def patient_superlink_database(busy_timeout_ms: int = SUPERLINK_BUSY_TIMEOUT_MS) -> None:
    """Let the SuperLink's SQLite wait ``busy_timeout_ms`` for a lock (call before flwr's ``flower_superlink``).

    With flwr's 5 s, twenty holders on 2 busy cores (load average above 20) made a write wait longer: the
    SuperLink answered one SuperNode's ``push-object`` (its train reply) and another's ``pull-object`` (its train
    message) with HTTP 500 "database is locked", flwr 1.42's SuperNode retries neither, and both messages were
    lost (RELIABILITY.md, "Load"). ``sql_mixin`` reads the pragma list it imported on every new connection."""
    check_flower_internals()
    # flwr internals: imported once check_flower_internals() accepted this flwr (module docstring)
    from flwr.supercore import sql_mixin

    sql_mixin.SQLITE_PRAGMAS = tuple(
        (name, str(int(busy_timeout_ms)) if name == "busy_timeout" else value) for name, value in sql_mixin.SQLITE_PRAGMAS
    )


class RunEndedWhileReceiving(Exception):
    """The run of a message ended (its ServerApp died or was stopped) while the SuperNode pulled the message."""


def _releasing_ended_runs(pull_objects: Callable) -> Callable:
    """flwr 1.42's SuperNode creates a task for a message and stores its header before pulling its objects; when
    the SuperLink answers that the run is no longer running (a coordinator killed mid-round), the
    ``RunNotRunningException`` (a BaseException) skips the cleanup of ``_pull_and_store_message``'s
    ``except Exception``, and the task stays pending forever without its objects: the warm task loop acquires it
    and waits for them, and no message of any later run is served. As an ``Exception``, the same cleanup runs:
    the header is deleted and the task finished as failed."""
    # flwr internals: imported once check_flower_internals() accepted this flwr (module docstring)
    from flwr.supercore.run import RunNotRunningException

    @functools.wraps(pull_objects)
    def pull(*args, **kwargs):
        try:
            return pull_objects(*args, **kwargs)
        except RunNotRunningException as ended:
            raise RunEndedWhileReceiving(f"the message's run is no longer running ({ended})") from None

    return pull


def shorten_serverapp_object_backoff() -> None:
    """Rebind the ServerApp grid's ``pull_objects`` so that a reply whose objects lag its header is re-pulled
    after 50 ms, not 1 s (call in the ServerApp process before the first pull)."""
    check_flower_internals()
    # flwr internals: imported once check_flower_internals() accepted this flwr (module docstring)
    from flwr.superlink.grid import http_grid

    if not isinstance(http_grid.pull_objects, functools.partial):
        http_grid.pull_objects = _short_backoff(http_grid.pull_objects)


def _short_backoff(pull_objects: Callable) -> Callable:
    return functools.partial(pull_objects, initial_backoff=OBJECT_BACKOFF_S, backoff_cap=OBJECT_BACKOFF_CAP_S)


# -- the warm task loop ----------------------------------------------------------------------------------------

TaskHandler = Callable[..., object]  # (message=Message, context=Context) -> Message, e.g. a flwr ClientApp


class WarmTaskLoop:
    """Serves every ClientApp task of a SuperNode started with ``--isolation process``, in this process.

    It does what ``flower-superexec`` and ``flwr-clientapp`` do for one task (acquire it, pull its input,
    run the app, push the reply and the task's output, heartbeat meanwhile), in a loop, so flwr and the
    app are imported once. The handler is the holder's own installed ClientApp: the run's FAB is never
    installed nor executed here. A task whose handler fails is answered with an error reply; a SuperNode
    that restarts is reconnected to.
    """

    def __init__(self, runtime_address: str, handler: TaskHandler, wake: threading.Event | None = None, poll_interval: float = 1.0,
                 secret: bytes | None = None):
        """``wake`` (``ActivePolling.arrived``) is set when the SuperNode stores a message: the loop then asks
        for the task at once instead of polling the Runtime API many times a second; ``poll_interval`` is the
        fallback poll. ``secret``: the SuperNode's ``--superexec-auth-secret-file`` secret, with which the loop
        signs its AcquireTask requests as ``flower-superexec`` does."""
        check_flower_internals()
        # flwr internals: imported once check_flower_internals() accepted this flwr (module docstring)
        from flwr.supernode.runtime import run_clientapp

        # A task is acquired as soon as the SuperNode stored the message's header, often before its objects:
        # re-pull them after 50 ms, not flwr's 1 s.
        if not isinstance(run_clientapp.pull_and_inflate_object_from_tree, functools.partial):
            run_clientapp.pull_and_inflate_object_from_tree = _short_backoff(run_clientapp.pull_and_inflate_object_from_tree)
        self.runtime_address, self.handler, self.poll_interval = runtime_address, handler, poll_interval
        self._secret = secret
        self.wake = wake or threading.Event()
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ewtune-warm-task-loop", daemon=True)

    def start(self) -> "WarmTaskLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        # flwr internals: imported once check_flower_internals() accepted this flwr (module docstring)
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        acquirer = self._client(component="SuperExec", secret=self._secret)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        while not self._stop.is_set():
            self.wake.clear()  # a message stored from here on wakes the wait below
            try:
                acquired = acquirer.AcquireTask(request)
            except Exception as failure:  # noqa: BLE001 - the SuperNode is restarting: try again shortly
                log.debug("AcquireTask failed (%s); retrying", failure)
                self._stop.wait(1.0)
                continue
            if acquired.HasField("task") and acquired.token:
                self._serve(acquired.token)
            else:
                self.wake.wait(self.poll_interval)

    def _serve(self, token: str) -> None:
        # flwr internals: imported once check_flower_internals() accepted this flwr (module docstring)
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        started = time.monotonic()
        client = self._client(component="flwr-clientapp", token=token)
        heartbeat = HeartbeatSender(_heartbeat(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "the task failed before its message was read"
        marks = {}
        try:
            message, context, _run, _fab = pull_task_input(client)
            marks["input"] = time.monotonic()
            reply = self.handler(message=message, context=context)
            marks["app"] = time.monotonic()
            status, details = SubStatus.COMPLETED, ""
        except Exception as failure:  # noqa: BLE001 - answer with an error rather than leave the task pending
            details = f"{type(failure).__name__}: {failure}"[:500]
            log.error("ClientApp task failed: %s", details)
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as failure:  # noqa: BLE001
            log.error("pushing the reply failed: %s", failure)
        finally:
            push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()
            self.served += 1
            kind = message.metadata.message_type if message is not None else "unread"
            log.info("%s message %s in %.2f s (%s)", kind, "answered" if status == SubStatus.COMPLETED else "failed",
                     time.monotonic() - started, _phases(started, marks, time.monotonic()))

    def _client(self, component: str, token: str | None = None, secret: bytes | None = None):
        # flwr internals: imported once check_flower_internals() accepted this flwr (module docstring)
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        if secret is not None:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=[ACQUIRE_TASK_METHOD]))
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=True,  # the Runtime API listens on loopback only
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )


def _phases(started: float, marks: dict[str, float], finished: float) -> str:
    """"input 0.05 s, app 1.20 s, reply 0.10 s": where a task's time went."""
    times, previous = [], started
    for name, at in marks.items():
        times.append(f"{name} {at - previous:.2f} s")
        previous = at
    return ", ".join([*times, f"reply {finished - previous:.2f} s"])


def _heartbeat(client) -> Callable[[], bool]:
    """A task heartbeat that reports failure instead of raising SIGINT (flwr's own would stop this whole
    process when the SuperNode has given up on one task)."""
    # flwr internals: imported once check_flower_internals() accepted this flwr (module docstring)
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(request).success)
        except Exception:  # noqa: BLE001 - transport errors are retried by HeartbeatSender
            return False

    return beat
