"""The one module that touches Flower internals (ewtune/federation/flower_internals.py): it refuses a flwr that is not
the pinned one or lacks a name it patches, its waits are short only while a run is active, and the SuperLink's
database waits long for a lock."""

import functools

import pytest

from ewtune.federation import flower_internals
from ewtune.federation.flower_internals import (
    ActivePolling,
    FlowerInternalsError,
    RunEndedWhileReceiving,
    check_flower_internals,
    patient_superlink_database,
    shorten_serverapp_object_backoff,
    shorten_supernode_waits,
)


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


def test_the_supernode_waits_are_rebound_and_activity_is_noted(monkeypatch):
    from flwr.supernode import start_client_internal as node

    for name in ("time", "_pull_and_store_message", "pull_objects"):
        monkeypatch.setattr(node, name, getattr(node, name))  # restored after the test
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


def test_a_message_of_a_run_that_ended_while_it_was_pulled_is_released_by_flwrs_own_cleanup(monkeypatch):
    """flwr's RunNotRunningException is a BaseException, which skips the cleanup (delete the header, finish the
    task) of ``_pull_and_store_message``'s ``except Exception``: the SuperNode then keeps a task without objects
    that blocks the warm task loop. The rebound pull raises an Exception instead; other failures pass as they are."""
    from flwr.supercore.run import RunNotRunningException
    from flwr.supernode import start_client_internal as node

    for name in ("time", "_pull_and_store_message", "pull_objects"):
        monkeypatch.setattr(node, name, getattr(node, name))
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
