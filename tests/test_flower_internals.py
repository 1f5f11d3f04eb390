"""The one module that touches Flower internals (ewtune/federation/flower_internals.py): it refuses a flwr that is not
the pinned one or lacks a name it patches, its waits are short only while a run is active, and the SuperLink's
database waits long for a lock.

What each of its six rebindings changes is measured on flwr's own code (flwr 1.42 offers no public setting for any
of them): the SuperNode main loop's ``time`` and ``_pull_and_store_message`` (a pull 0.1 s after a message, backing
off, instead of every 3 s; 3 s when idle; the warm task loop woken; 0.02 s reply waits instead of 0.5 s), the
object pulls of the SuperNode, the ServerApp's grid and the warm task loop (a lagging object pulled again after
50 ms instead of 1 s), and the SuperLink's SQLite pragmas (a write outwaits a lock that fails flwr's own after 5 s)."""

import contextlib
import functools
import threading
import time
import types

import pytest

from ewtune.federation import flower_internals
from ewtune.federation.flower_internals import (
    ActivePolling,
    FlowerInternalsError,
    RunEndedWhileReceiving,
    WarmTaskLoop,
    check_flower_internals,
    patient_superlink_database,
    shorten_serverapp_object_backoff,
    shorten_supernode_waits,
)


@pytest.fixture
def supernode_module(monkeypatch):
    """flwr's SuperNode module; every attribute the rebinding touches is restored after the test."""
    from flwr.supernode import start_client_internal as node

    for name in ("time", "_pull_and_store_message", "pull_objects"):
        monkeypatch.setattr(node, name, getattr(node, name))
    return node


def test_the_pinned_flwr_passes_the_check():
    check_flower_internals()


def test_another_flwr_version_is_refused():
    with pytest.raises(FlowerInternalsError, match=r"flwr 1\.43\.0 is installed, 1\.42\.0 is pinned"):
        check_flower_internals(version="1.43.0")


def test_a_missing_internal_name_is_refused_by_name(monkeypatch):
    from flwr.supernode import start_client_internal

    monkeypatch.delattr(start_client_internal, "_pull_and_store_message")
    with pytest.raises(FlowerInternalsError, match=r"start_client_internal\._pull_and_store_message is missing"):
        check_flower_internals()
    with pytest.raises(FlowerInternalsError):
        shorten_supernode_waits()  # nothing is patched on a flwr that differs


def test_a_missing_internal_module_is_refused(monkeypatch):
    monkeypatch.setitem(flower_internals.REQUIRED_INTERNALS, "flwr.no_such_module", ("x",))
    with pytest.raises(FlowerInternalsError, match="flwr.no_such_module does not import"):
        check_flower_internals()


def test_polling_backs_off_within_the_active_window_and_is_flwrs_outside_it(monkeypatch):
    now = [1000.0]
    slept = []
    monkeypatch.setattr(flower_internals.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(flower_internals.time, "sleep", slept.append)
    polling = ActivePolling(fast_poll=0.1, reply_wait=0.02, active_window=120.0, growth=2.0, slow_poll=0.5)
    assert polling.interval(3) == 3  # an idle node polls as flwr does
    assert not polling.arrived.is_set()
    polling.message_seen()
    assert polling.arrived.is_set()  # the task loop is woken
    for _ in range(5):
        polling.sleep(3)  # empty pulls after the message
    assert slept == [0.1, 0.2, 0.4, 0.5, 0.5]  # fast first, doubling, capped
    polling.sleep(0.5)
    assert slept[-1] == 0.02  # waits for a reply or an object are short, and are not empty pulls
    assert polling.interval(3) == 0.5
    polling.message_seen()
    assert polling.interval(3) == 0.1  # a new message starts the backoff again
    now[0] += 121.0
    assert polling.interval(3) == 3  # back to flwr's interval once the run has gone quiet
    polling.empty_pulls = 10**6  # a node idle for weeks
    now[0] -= 121.0
    assert polling.interval(3) == 0.5  # the backoff's power does not overflow
    assert polling.monotonic is flower_internals.time.monotonic  # any other attribute is the time module's


def test_the_supernode_waits_are_rebound_and_activity_is_noted(monkeypatch, supernode_module):
    node = supernode_module
    calls = []
    monkeypatch.setattr(node, "_pull_and_store_message", lambda **kwargs: calls.append(kwargs) or kwargs.get("run_id"))
    polling = shorten_supernode_waits(ActivePolling(active_window=60.0))
    assert node.time is polling
    backoff = node.pull_objects.__wrapped__  # inside the wrapper that releases the messages of ended runs
    assert isinstance(backoff, functools.partial) and backoff.keywords["initial_backoff"] == 0.05
    assert node._pull_and_store_message(run_id=None) is None and polling.interval(3) == 3
    assert node._pull_and_store_message(run_id=7) == 7 and polling.interval(3) == polling.fast_poll


def test_the_serverapp_object_backoff_is_rebound_once(monkeypatch):
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    shorten_serverapp_object_backoff()
    shorten_serverapp_object_backoff()
    assert isinstance(http_grid.pull_objects, functools.partial)
    assert not isinstance(http_grid.pull_objects.func, functools.partial)  # not wrapped twice
    assert http_grid.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}


def test_a_message_of_a_run_that_ended_while_it_was_pulled_is_released_by_flwrs_own_cleanup(monkeypatch, supernode_module):
    """flwr's RunNotRunningException is a BaseException, which skips the cleanup (delete the header, finish the
    task) of ``_pull_and_store_message``'s ``except Exception``: the SuperNode then keeps a task without objects
    that blocks the warm task loop. The rebound pull raises an Exception instead; other failures pass as they are."""
    from flwr.supercore.run import RunNotRunningException
    node = supernode_module
    failures = iter([RunNotRunningException("run 7"), KeyError("object")])

    def pull_objects(object_ids, pull_object_fn, initial_backoff=None, backoff_cap=None):
        raise next(failures)

    monkeypatch.setattr(node, "pull_objects", pull_objects)
    shorten_supernode_waits(ActivePolling(active_window=60.0))
    with pytest.raises(RunEndedWhileReceiving, match="no longer running"):
        node.pull_objects(["a"], pull_object_fn=None)
    assert issubclass(RunEndedWhileReceiving, Exception)
    with pytest.raises(KeyError):
        node.pull_objects(["a"], pull_object_fn=None)


def test_the_superlinks_database_waits_two_minutes_for_a_lock_and_keeps_flwrs_other_pragmas(monkeypatch):
    import sqlite3

    from flwr.supercore import sql_mixin

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    before = dict(sql_mixin.SQLITE_PRAGMAS)
    assert before["busy_timeout"] == "5000"  # flwr's own: the 500s of the 20-holder load test
    patient_superlink_database()
    connection = sqlite3.connect(":memory:")
    sql_mixin._set_sqlite_pragmas(connection, None)  # what the SuperLink runs on each new connection
    assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == 120_000
    assert {**before, "busy_timeout": "120000"} == dict(sql_mixin.SQLITE_PRAGMAS)


# -- what each rebinding changes, measured on flwr's own code ----------------------------------------------------


class _StopNode(BaseException):
    """Ends flwr's SuperNode main loop once a test has the pulls it needs (a BaseException, as flwr's own exits are)."""


def _supernode_main_loop_pulls(monkeypatch, node, pulls: int, messages_at: set[int], polling: ActivePolling) -> list[float]:
    """Run flwr's own ``start_client_internal`` main loop, rebound by ``shorten_supernode_waits(polling)``, its
    SuperLink connection replaced by one that records when each pull is made; the pulls numbered in ``messages_at``
    (from 1) bring a message, and the pull after the first ``pulls`` ends the loop. Returns the times of the pulls,
    that last one included."""
    times = []

    def pull_and_store(**_):
        times.append(time.monotonic())
        if len(times) > pulls:
            raise _StopNode
        return 7 if len(times) in messages_at else None  # the run id of a stored message, or nothing pulled

    @contextlib.contextmanager
    def connection(**_):
        yield (1, *([None] * 7))  # node id 1; the loop hands the other parts to the (stood-in) pull and push only

    node_state = types.SimpleNamespace(set_node_id=lambda node_id: None)
    state_factory = types.SimpleNamespace(state=lambda: node_state, objectstore_factory=types.SimpleNamespace(store=lambda: None))
    monkeypatch.setattr(node, "_pull_and_store_message", pull_and_store)
    monkeypatch.setattr(node, "_push_messages", lambda **_: None)
    monkeypatch.setattr(node, "_init_connection", connection)
    monkeypatch.setattr(node, "register_signal_handlers", lambda **_: None)  # pytest's own handlers stay
    shorten_supernode_waits(polling)
    with pytest.raises(_StopNode):
        node.start_client_internal(state_factory=state_factory, server_address="127.0.0.1:1", node_config={}, insecure=True,
                                   isolation="process")
    return times


def _gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in zip(times, times[1:])]


# A busy 2-core machine wakes a sleeping thread late, never early: each wait is bounded below by what was planned
# and above by half of what flwr's own would be, far above any planned value.


def test_after_a_message_flwrs_supernode_loop_polls_within_0_1_s_then_backs_off(monkeypatch, supernode_module):
    polling = ActivePolling(fast_poll=0.1, growth=1.5, slow_poll=1.0, active_window=60.0)
    times = _supernode_main_loop_pulls(monkeypatch, supernode_module, pulls=5, messages_at={1}, polling=polling)
    assert polling.arrived.is_set()  # the message woke the warm task loop
    after_message, *backoff = _gaps(times)
    assert after_message < 1.5  # the reply is pushed and the next pull made at once
    assert len(backoff) == 4
    for gap, planned in zip(backoff, [0.1, 0.15, 0.225, 0.3375]):  # flwr: 3 s each
        assert planned * 0.95 <= gap < 1.5


def test_an_idle_supernode_polls_every_3_s_as_flwr_does(monkeypatch, supernode_module):
    """Outside the active window (no message yet) the rebound loop sleeps flwr's own 3 s between empty pulls."""
    (idle,) = _gaps(_supernode_main_loop_pulls(monkeypatch, supernode_module, pulls=1, messages_at=set(), polling=ActivePolling()))
    assert 3.0 <= idle < 4.5


def test_the_supernode_waits_0_02_s_not_0_5_s_for_the_clientapps_reply(supernode_module):
    """flwr's ``_push_messages`` polls the node state for the ClientApp's reply; rebound, each wait is 0.02 s."""
    node = supernode_module
    shorten_supernode_waits(ActivePolling())
    looks = []

    def replies(is_reply):
        looks.append(time.monotonic())
        if len(looks) == 6:
            raise _StopNode
        return []  # the ClientApp has not answered yet

    with pytest.raises(_StopNode):
        node._push_messages(state=types.SimpleNamespace(get_messages_legacy=replies), object_store=None, send=None, push_object=None)
    assert all(0.02 * 0.95 <= gap for gap in _gaps(looks))
    assert looks[-1] - looks[0] < 5 * 0.5 / 2  # five waits; flwr: 0.5 s each


def _lagging_record():
    """A Flower object and a pull of it that finds it not yet stored on the first try (its header came first)."""
    from flwr.app import ConfigRecord
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    record = ConfigRecord({"round": 1, "plan": "x" * 100})
    tries = []

    def pull_object(object_id):
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise ObjectUnavailableError(object_id)
        return record.deflate()

    return record, pull_object, tries


def test_flwrs_own_object_pull_retries_after_about_1_s():
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    record, pull_object, tries = _lagging_record()
    assert pull_objects([record.object_id], pull_object_fn=pull_object) == {record.object_id: record.deflate()}
    assert 0.8 <= _gaps(tries)[0]  # 1 s, jittered by 20%: what each rebinding below shortens


def test_the_supernode_pulls_a_lagging_object_again_after_0_05_s(supernode_module):
    node = supernode_module
    shorten_supernode_waits(ActivePolling())
    record, pull_object, tries = _lagging_record()
    assert node.pull_objects([record.object_id], pull_object_fn=pull_object) == {record.object_id: record.deflate()}
    assert 0.05 * 0.8 <= _gaps(tries)[0] < 0.4  # 50 ms jittered by 20%; flwr: at least 0.8 s


def test_the_serverapp_pulls_a_lagging_reply_object_again_after_0_05_s(monkeypatch):
    from flwr.superlink.grid import http_grid

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    shorten_serverapp_object_backoff()
    record, pull_object, tries = _lagging_record()
    assert http_grid.pull_objects([record.object_id], pull_object_fn=pull_object) == {record.object_id: record.deflate()}
    assert 0.05 * 0.8 <= _gaps(tries)[0] < 0.4  # 50 ms jittered by 20%; flwr: at least 0.8 s


def test_the_warm_task_loop_pulls_a_lagging_message_object_again_after_0_05_s(monkeypatch):
    from flwr.app import ConfigRecord
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supernode.runtime import run_clientapp

    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree", run_clientapp.pull_and_inflate_object_from_tree)
    WarmTaskLoop("127.0.0.1:1", handler=lambda **_: None)  # rebinds at construction; never started
    record, pull_object, tries = _lagging_record()
    confirmed = []
    pulled = run_clientapp.pull_and_inflate_object_from_tree(get_object_tree(record), pull_object, confirmed.append,
                                                             return_type=ConfigRecord)
    assert dict(pulled) == dict(record) and confirmed == [record.object_id]
    assert 0.05 * 0.8 <= _gaps(tries)[0] < 0.4  # 50 ms jittered by 20%; flwr: at least 0.8 s


def test_a_superlink_write_outwaits_a_lock_that_fails_flwrs_own_after_5_s(monkeypatch, tmp_path):
    """Two of the SuperLink's SQL object stores on one database file, one connected with flwr's pragmas and one
    after ``patient_superlink_database``; another connection holds the write lock until flwr's write has given up.
    flwr's fails with "database is locked" after its 5 s; the patient one waits the lock out and writes."""
    import sqlite3

    from flwr.proto.message_pb2 import ObjectTree
    from flwr.supercore import sql_mixin
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore

    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    database = str(tmp_path / "superlink.db")
    flwrs = SqlObjectStore(database)
    flwrs.initialize()
    flwrs.get("ab" * 32)  # its pooled connection is made now, with flwr's 5 s busy_timeout
    patient_superlink_database()
    patient = SqlObjectStore(database)
    patient.initialize()
    patient.get("ab" * 32)

    locker = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    outcomes = {}

    def write(name, store, object_id):
        started = time.monotonic()
        try:
            store.preregister(1, ObjectTree(object_id=object_id))
            outcomes[name] = ("written", time.monotonic() - started)
        except Exception as failure:  # noqa: BLE001 - what flwr's write raises is the point
            outcomes[name] = (str(failure), time.monotonic() - started)

    flwr_writer = threading.Thread(target=write, args=("flwr", flwrs, "cd" * 32))
    patient_writer = threading.Thread(target=write, args=("patient", patient, "ef" * 32))
    patient_writer.start()
    flwr_writer.start()
    flwr_writer.join(60)
    locker.execute("COMMIT")  # only now, after flwr's write gave up
    patient_writer.join(60)
    locker.close()
    flwr_outcome, flwr_waited = outcomes["flwr"]
    assert "database is locked" in flwr_outcome and 4.9 <= flwr_waited < 10.0
    assert outcomes["patient"][0] == "written" and outcomes["patient"][1] >= 5.0


def _receive_a_message_whose_run_ends(node) -> list[tuple]:
    """flwr's own ``_pull_and_store_message`` receiving a message whose run stops while its objects are pulled; returns
    what it did to the SuperNode's state (a stand-in that records each call)."""
    from flwr.supercore.run import RunNotRunningException

    calls = []
    metadata = types.SimpleNamespace(run_id=7, group_id="", message_type="train", message_id="m1")
    run = types.SimpleNamespace(primary_task_type="client_app", fab_hash="f")
    state = types.SimpleNamespace(
        get_run=lambda run_id: run,
        create_task=lambda **task: calls.append(("create_task", task["run_id"])) or 11,
        store_message=lambda message: calls.append(("store_message", message.metadata.message_id)),
        delete_messages=lambda message_ids: calls.append(("delete_messages", tuple(message_ids))),
        finish_task=lambda task_id, sub_status, details: calls.append(("finish_task", task_id, sub_status)),
    )
    store = types.SimpleNamespace(preregister=lambda run_id, tree: ["o1"], delete=lambda object_id: calls.append(("delete", object_id)))

    def pull_object(run_id, object_id):
        raise RunNotRunningException(f"run {run_id} is stopped")

    node._pull_and_store_message(
        state=state, object_store=store, node_config={}, receive=lambda: (types.SimpleNamespace(metadata=metadata), None),
        get_run=None, get_fab=None, pull_object=pull_object, confirm_message_received=None, trusted_entities=None,
    )
    return calls


def test_a_message_whose_run_ended_mid_pull_is_deleted_and_its_task_failed_not_left_pending(supernode_module):
    from flwr.common.constant import SubStatus

    left_by_flwr = _receive_a_message_whose_run_ends(supernode_module)
    assert left_by_flwr == [("create_task", 7), ("store_message", "m1")]  # flwr's own: the task stays pending
    shorten_supernode_waits(ActivePolling())
    assert _receive_a_message_whose_run_ends(supernode_module) == [
        ("create_task", 7), ("store_message", "m1"), ("delete_messages", ("m1",)), ("delete", "m1"),
        ("finish_task", 11, SubStatus.FAILED),
    ]
