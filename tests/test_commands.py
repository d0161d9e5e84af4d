"""`openhands.*` commands (issue 8 §3): argument checks, output, and that MongoDB work never runs on
the caller's thread (mitmproxy calls commands on its event loop)."""
from __future__ import annotations

from typing import Iterator

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon.core.masking import mask_key
from addon.operator.commands import PoolCommands, check_api_key, check_dollars, check_id, keys_table
from addon.pool.pool import Pool
from addon.services import Services
from tests.memory_store import MemoryStore, make_writer

POOL_KEY = "sk-pool-0123456789abcdef"


KEY_ENV = "OH_TEST_COMMAND_KEY"
KEY_ARG = f"env:{KEY_ENV}"  # commands never take the key itself (mitmproxy records command lines)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def pool(store, tmp_path, monkeypatch) -> Iterator[Pool]:
    """The real pool on the in-memory store; `store.gate` makes the "database" hang."""
    monkeypatch.setenv(KEY_ENV, POOL_KEY)
    writer = make_writer(store, tmp_path / "journal.jsonl")
    writer.start()
    p = Pool(store, writer, threshold=lambda: 9.95, default_budget=lambda: 10.0)
    p.sync()
    yield p
    store.gate.set()
    writer.stop()


@pytest.fixture
def cmds(pool):
    services = Services(pool=pool)
    services.ready.set()
    c = PoolCommands(services)
    yield c
    c.close()


def store_threads(store: MemoryStore) -> set[str]:
    """Threads that called the database, the writer's own thread aside."""
    return {t for _, t in store.call_threads if t != "openhands-store-writer"}


def run(c: PoolCommands, method: str, *args) -> str:
    """Call a command and wait for its background job, as an operator reading the log would."""
    out = getattr(c, method)(*args)
    assert c.last is not None
    c.last.result(timeout=30)
    return out


# -- argument checks (pure) -----------------------------------------------------------------------
@pytest.mark.parametrize("key_id,ok", [("k1", True), ("team-a.key_2:x@y", True), ("", False), ("a b", False),
                                       ("../etc", False), ("-lead", False), ("k" * 129, False), ("a..b", False)])
def test_check_id(key_id, ok):
    if ok:
        assert check_id(key_id) == key_id
    else:
        with pytest.raises(exceptions.CommandError):
            check_id(key_id)


@pytest.mark.parametrize("api_key,ok", [(POOL_KEY, True), ("", False), ("sk with space", False),
                                        ("sk\x00", False), ("x" * 513, False)])
def test_check_api_key(api_key, ok):
    if ok:
        assert check_api_key(api_key) == api_key
    else:
        with pytest.raises(exceptions.CommandError):
            check_api_key(api_key)


@pytest.mark.parametrize("dollars,ok", [(10, True), (0.5, True), (0, False), (-1, False), (float("nan"), False),
                                        (float("inf"), False), (True, False), (2_000_000, False),
                                        ("12.5", True), ("$3", True), ("lots", False), ("nan", False)])
def test_check_dollars(dollars, ok):
    if ok:
        assert check_dollars(dollars) == float(str(dollars).lstrip("$"))
    else:
        with pytest.raises(exceptions.CommandError):
            check_dollars(dollars)


def test_keys_table_shows_masked_keys_and_totals():
    rows = [{"id": "k1", "apiKey": mask_key(POOL_KEY), "status": "healthy", "spendEstimate": 1.5, "totalSpend": 2.0,
             "budgetLimit": 10.0, "rotationPoint": 9.95, "spendPercentage": 20.0, "requestsCount": 7}]
    text = keys_table(rows, 1, 3)
    assert POOL_KEY not in text
    line = text.splitlines()[2]
    assert line.split() == ["k1", "sk-pool-...cdef", "healthy", "2.0000", "10.00", "9.95", "20.0", "7"]
    assert text.splitlines()[-1] == "1 key(s), 1/3 backup(s) available"


# -- commands -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,args,expect_log,effect", [
    ("add", ("k9", KEY_ARG), "added key k9 (sk-pool-...cdef)",
     lambda st: st.get_key("k9")["status"] == "healthy"),
    ("backup", ("b1", KEY_ARG), "added backup key b1 (sk-pool-...cdef); 1/1 available",
     lambda st: st.backup_exists("b1")),
    ("rotate", ("k1",), "rotated k1 -> nothing (no usable key or backup left)",
     lambda st: st.get_key("k1")["status"] == "exhausted"),
    ("reset", ("k1",), "reset k1: healthy, spend and counters at zero",
     lambda st: st.get_key("k1")["spendEstimate"] == 0.0),
    ("budget", ("k1", 25.0), "k1 budget set to $25.00", lambda st: st.get_key("k1")["budgetLimit"] == 25.0),
])
def test_mutating_commands_run_off_the_calling_thread(cmds, pool, store, method, args, expect_log, effect, caplog):
    pool.add_key("k1", "sk-pool-1111111111111111", None)
    pool.record_usage("k1", 1.5, 10)
    store.call_threads.clear()
    caplog.set_level("INFO", logger="addon.operator.commands")
    started = run(cmds, method, *args)
    assert started.endswith("started; the result will appear in the event log")
    assert POOL_KEY not in started
    threads = store_threads(store)
    assert threads and all(t.startswith("openhands-command") for t in threads), threads  # never the caller's
    assert effect(store)
    assert expect_log in caplog.text
    assert POOL_KEY not in caplog.text


def test_a_slow_database_does_not_block_the_command(cmds, store):
    store.gate.clear()  # MongoDB "hangs"
    out = cmds.add("k2", KEY_ARG)  # returns at once
    assert "started" in out and not cmds.last.done()
    store.gate.set()
    cmds.last.result(timeout=30)
    assert store.get_key("k2") is not None


def test_jobs_run_in_the_order_typed(cmds, pool, store):
    pool.add_key("k1", "sk-pool-1111111111111111", None)
    store.gate.clear()
    cmds.add("k2", KEY_ARG)
    first = cmds.last
    cmds.budget("k1", 20)
    cmds.budget("k1", 30)
    store.gate.set()
    first.result(timeout=30)
    cmds.last.result(timeout=30)
    assert store.get_key("k2") is not None and store.get_key("k1")["budgetLimit"] == 30.0  # the last one typed


@pytest.mark.parametrize("method,args,message", [
    ("add", ("k1", KEY_ARG), "already exists"),
    ("add", ("bad id", KEY_ARG), "invalid key id"),
    ("add", ("k2", POOL_KEY), "do not take a key itself"),  # it would land in mitmproxy's command history
    ("add", ("k2", "env:OH_TEST_UNSET_VARIABLE"), "not set"),
    ("backup", ("k1", KEY_ARG), "active key already has id"),
    ("rotate", ("nope",), "no key 'nope'"),
    ("reset", ("nope",), "no key 'nope'"),
    ("budget", ("k1", -5), "positive number"),
    ("budget", ("nope", 5), "no key 'nope'"),
])
def test_bad_arguments_fail_at_once_and_change_nothing(cmds, pool, store, method, args, message):
    pool.add_key("k1", POOL_KEY, None)
    assert pool.writer.flush(10)
    before = store.snapshot()
    store.call_threads.clear()
    with pytest.raises(exceptions.CommandError, match=message):
        getattr(cmds, method)(*args)
    assert store_threads(store) == set() and cmds.last is None
    assert store.snapshot() == before


def test_failures_in_the_background_are_logged(cmds, store, caplog):
    caplog.set_level("INFO", logger="addon.operator.commands")
    store.insert_backup("b1", "sk-peer-0123456789abcdef")  # a peer sidecar added it first
    run(cmds, "backup", "b1", KEY_ARG)
    assert "add backup key b1 (sk-pool-...cdef) failed: backup key 'b1' already exists" in caplog.text


def test_commands_refuse_while_the_pool_is_starting_or_failed(cmds):
    cmds.services.ready.clear()
    with pytest.raises(exceptions.CommandError, match="not ready"):
        cmds.keys()
    cmds.services.ready.set()
    cmds.services.failed = "cannot reach MongoDB"
    with pytest.raises(exceptions.CommandError, match="cannot reach MongoDB"):
        cmds.add("k1", KEY_ARG)


# -- through mitmproxy's command manager, as mitmweb's command bar calls them -----------------------
@pytest.fixture
def addon(pool):
    from addon.operator.commands_addon import CommandsAddon

    services = Services(pool=pool)
    services.ready.set()
    a = CommandsAddon(services)
    yield a
    a.commands.close()


def test_registered_with_mitmproxy_and_callable_by_name(addon, pool):
    with taddons.context(addon) as tctx:
        names = set(tctx.master.commands.commands)
        assert {"openhands.keys", "openhands.add", "openhands.backup", "openhands.rotate", "openhands.reset",
                "openhands.budget"} <= names
        assert all(set(n) <= set("abcdefghijklmnopqrstuvwxyz.") for n in names if n.startswith("openhands"))
        out = tctx.master.commands.call_strings("openhands.add", ["k1", KEY_ARG])
        assert "started" in out
        addon.commands.last.result(timeout=30)
        tctx.master.commands.call_strings("openhands.budget", ["k1", "12.5"])
        addon.commands.last.result(timeout=30)
        table = tctx.master.commands.call_strings("openhands.keys", [])
        assert "k1" in table and "12.50" in table and POOL_KEY not in table
        with pytest.raises(exceptions.CommandError):
            tctx.master.commands.call_strings("openhands.budget", ["k1", "lots"])
