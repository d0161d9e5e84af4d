"""`openhands.*` commands (issue 8 §3): argument checks, output, and that MongoDB work never runs on
the caller's thread (mitmproxy calls commands on its event loop)."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon.operator.commands import PoolCommands, check_api_key, check_dollars, check_id, keys_table
from addon.core.masking import mask_key

POOL_KEY = "sk-pool-0123456789abcdef"


class FakePool:
    """The Pool surface the commands use; blocking methods record the thread they ran on."""

    def __init__(self) -> None:
        self.keys: dict[str, dict] = {}
        self.backups: dict[str, str] = {}
        self.backups_unused = self.backups_total = 0
        self.calls: list[tuple[str, str, str]] = []  # (method, key id, thread name)
        self.gate = threading.Event()
        self.gate.set()
        self.store = SimpleNamespace(insert_backup=self._insert_backup)

    def _blocking(self, name: str, key_id: str) -> None:
        assert self.gate.wait(10)
        self.calls.append((name, key_id, threading.current_thread().name))

    def get(self, key_id):
        return self.keys.get(key_id)

    def snapshot_public(self):
        return [self.keys[k] for k in sorted(self.keys)]

    def add_key(self, key_id, api_key, budget):
        self._blocking("add_key", key_id)
        if key_id in self.keys:
            return False
        self.keys[key_id] = {"id": key_id, "apiKey": mask_key(api_key), "status": "healthy", "spendEstimate": 0.0,
                             "totalSpend": 0.0, "budgetLimit": budget or 10.0, "rotationPoint": 9.95,
                             "spendPercentage": 0.0, "requestsCount": 0}
        return True

    def _insert_backup(self, key_id, api_key):
        self._blocking("insert_backup", key_id)
        if key_id in self.backups:
            return False
        self.backups[key_id] = api_key
        return True

    def sync(self):
        self.backups_total = self.backups_unused = len(self.backups)

    def rotate(self, key_id, error=None):
        self._blocking("rotate", key_id)
        self.keys[key_id]["status"] = "exhausted"
        return SimpleNamespace(new_id=None)

    def reset_key(self, key_id):
        self._blocking("reset_key", key_id)
        self.keys[key_id]["status"] = "healthy"
        return True

    def set_fields(self, key_id, fields):
        self._blocking("set_fields", key_id)
        self.keys[key_id]["budgetLimit"] = fields["budgetLimit"]
        return True


@pytest.fixture
def pool() -> FakePool:
    return FakePool()


@pytest.fixture
def cmds(pool):
    sidecar = SimpleNamespace(pool=pool, ready=threading.Event(), failed=None)
    sidecar.ready.set()
    c = PoolCommands(sidecar)  # type: ignore[arg-type]
    yield c
    c.close()


def run(c: PoolCommands, method: str, *args) -> str:
    """Call a command and wait for its background job, as an operator reading the log would."""
    out = getattr(c, method)(*args)
    assert c.last is not None
    c.last.result(timeout=10)
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
@pytest.mark.parametrize("method,args,expect_call,expect_log", [
    ("add", ("k9", POOL_KEY), "add_key", "added key k9 (sk-pool-...cdef)"),
    ("backup", ("b1", POOL_KEY), "insert_backup", "added backup key b1 (sk-pool-...cdef); 1/1 available"),
    ("rotate", ("k1",), "rotate", "rotated k1 -> nothing (no usable key or backup left)"),
    ("reset", ("k1",), "reset_key", "reset k1: healthy, spend and counters at zero"),
    ("budget", ("k1", 25.0), "set_fields", "k1 budget set to $25.00"),
])
def test_mutating_commands_run_off_the_calling_thread(cmds, pool, method, args, expect_call, expect_log, caplog):
    pool.add_key("k1", "sk-pool-1111111111111111", None)
    pool.calls.clear()
    caplog.set_level("INFO", logger="addon.operator.commands")
    started = run(cmds, method, *args)
    assert started.endswith("started; the result will appear in the event log")
    assert POOL_KEY not in started
    (name, key_id, thread), = pool.calls
    assert name == expect_call and key_id == args[0]
    assert thread.startswith("openhands-command") and thread != threading.current_thread().name
    assert expect_log in caplog.text
    assert POOL_KEY not in caplog.text


def test_a_slow_database_does_not_block_the_command(cmds, pool):
    pool.gate.clear()  # MongoDB "hangs"
    out = cmds.add("k2", POOL_KEY)  # returns at once
    assert "started" in out and not cmds.last.done()
    pool.gate.set()
    cmds.last.result(timeout=10)
    assert "k2" in pool.keys


def test_jobs_run_in_the_order_typed(cmds, pool):
    pool.gate.clear()
    cmds.add("k2", POOL_KEY)
    pool.keys["k2"] = {"id": "k2"}  # what the in-memory check sees once the add landed
    first = cmds.last
    cmds.budget("k2", 20)
    pool.keys.pop("k2")
    pool.gate.set()
    first.result(timeout=10)
    cmds.last.result(timeout=10)
    assert [c[0] for c in pool.calls] == ["add_key", "set_fields"]


@pytest.mark.parametrize("method,args,message", [
    ("add", ("k1", POOL_KEY), "already exists"),
    ("add", ("bad id", POOL_KEY), "invalid key id"),
    ("backup", ("k1", POOL_KEY), "active key already has id"),
    ("rotate", ("nope",), "no key 'nope'"),
    ("reset", ("nope",), "no key 'nope'"),
    ("budget", ("k1", -5), "positive number"),
    ("budget", ("nope", 5), "no key 'nope'"),
])
def test_bad_arguments_fail_at_once_and_change_nothing(cmds, pool, method, args, message):
    pool.add_key("k1", POOL_KEY, None)
    pool.calls.clear()
    with pytest.raises(exceptions.CommandError, match=message):
        getattr(cmds, method)(*args)
    assert pool.calls == [] and cmds.last is None


def test_failures_in_the_background_are_logged(cmds, pool, caplog):
    caplog.set_level("INFO", logger="addon.operator.commands")
    pool.backups["b1"] = "x"  # a peer sidecar added it first
    run(cmds, "backup", "b1", POOL_KEY)
    assert "add backup key b1 (sk-pool-...cdef) failed: backup key 'b1' already exists" in caplog.text


def test_commands_refuse_while_the_pool_is_starting_or_failed(cmds):
    cmds.services.ready.clear()
    with pytest.raises(exceptions.CommandError, match="not ready"):
        cmds.keys()
    cmds.services.ready.set()
    cmds.services.failed = "cannot reach MongoDB"
    with pytest.raises(exceptions.CommandError, match="cannot reach MongoDB"):
        cmds.add("k1", POOL_KEY)


# -- through mitmproxy's command manager, as mitmweb's command bar calls them -----------------------
@pytest.fixture
def addon(pool):
    from addon.operator.commands_addon import CommandsAddon
    from addon.services import Services

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
        out = tctx.master.commands.call_strings("openhands.add", ["k1", POOL_KEY])
        assert "started" in out
        addon.commands.last.result(timeout=10)
        tctx.master.commands.call_strings("openhands.budget", ["k1", "12.5"])
        addon.commands.last.result(timeout=10)
        table = tctx.master.commands.call_strings("openhands.keys", [])
        assert "k1" in table and "12.50" in table and POOL_KEY not in table
        with pytest.raises(exceptions.CommandError):
            tctx.master.commands.call_strings("openhands.budget", ["k1", "lots"])
