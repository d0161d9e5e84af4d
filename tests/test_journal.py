"""Write-ahead journal: every queued update survives kill -9 (with MongoDB up or down) and a second
kill during replay, is replayed exactly once, and is dropped once MongoDB acknowledged it.

Crashes are real: a child Python process builds the writer, queues updates and SIGKILLs itself.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from addon.store.journal import Journal, encode_op, orphans
from addon.store.mongo import PoolStore, new_key_doc, utcnow
from addon.store.writer import StoreWriter, usage_op

ROOT = Path(__file__).resolve().parent.parent


def eventually(check, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(every)


# -- the journal on its own ----------------------------------------------------------------------
@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "written"])
def test_acknowledged_segments_go_and_only_unacknowledged_ops_are_left_for_replay(tmp_path, mapped):
    j = Journal(tmp_path / "j", segment_ops=4, mapped=mapped)
    seqs = [j.append({"kind": "set", "key_id": "a", "set": {"n": i}}) for i in range(10)]
    assert seqs == list(range(1, 11))
    assert len(list(j.dir.glob("seg-*"))) == 3
    j.ack(seqs[:6])
    assert len(list(j.dir.glob("seg-*"))) == 2  # segment 0 fully acknowledged; segment 1 still has 2 ops
    j.ack(seqs[6:8])
    assert [p.name for p in sorted(j.dir.glob("seg-*"))] == ["seg-00000002.jsonl"]
    assert list(orphans(tmp_path / "j")) == []  # a live journal is never taken for an orphan
    assert j.close() == 2
    (orphan,) = list(orphans(tmp_path / "j"))
    assert [op["set"]["n"] for _, op in orphan.pending_ops()] == [8, 9]
    orphan.remove()
    assert list((tmp_path / "j").iterdir()) == []


USAGE = usage_op("k1", 0.0017, 31800, 1_764_600_000.123456, None, "0123456789abcdef-42")


@pytest.mark.parametrize("op", [
    USAGE,
    {**USAGE, "key_spend_floor": 12.345678901234567},
    {**USAGE, "key_id": 'odd "key" \\ ünïcødé \x00 \n'},  # escaped, never a raw NUL or newline
    {**USAGE, "cost": 3},  # not a float: the general encoder
    {**USAGE, "tokens": True},
    {**USAGE, "cost": float("inf")},
    {**USAGE, "key_id": "lone \ud800 surrogate"},  # the fast encoder refuses it: the general one writes it
    {**USAGE, "tokens": 2 ** 70},  # past 64 bits: likewise
    {**USAGE, "cost": 1e-7, "key_spend_floor": 1e16},  # exponents, written either way, read back the same
    {**USAGE, "extra": 1},
    {**{k: v for k, v in USAGE.items() if k != "key_spend_floor"}, "other": 1},  # seven fields, not the usual
    {"kind": "set", "key_id": "a", "set": {"status": "exhausted", "lastError": "budget"}},
    {"kind": "touch", "clients": ["c1", "c2"]},
])
def test_every_op_is_journaled_as_json_that_reads_back_as_it_was(op):
    line = encode_op(op)
    assert b"\x00" not in line and b"\n" not in line
    got, want = json.loads(line), json.loads(json.dumps(op))
    if "at" in want:  # kept to the millisecond, as MongoDB stores it
        assert got.pop("at") == pytest.approx(want.pop("at"), abs=5e-4)
    assert got == want


def test_a_torn_line_in_a_mapped_segment_and_a_replay_ack_after_it(tmp_path):
    """Killed in the middle of a store: a cut line, then the preallocated NUL tail; the replaying
    process appends its acknowledgement after that tail. Nothing is lost, nothing replayed twice."""
    j = Journal(tmp_path / "j")
    for i in range(3):
        j.append({"kind": "set", "key_id": "a", "set": {"n": i}})
    seg = j._cur
    assert seg is not None and seg.mem is not None
    seg.mem[seg.pos:seg.pos + 20] = b'{"s":4,"op":{"kind":'  # the kill: the copy stopped midway
    os.close(j._lock_fd)  # the process is gone: its flock with it
    (orphan,) = list(orphans(tmp_path / "j"))
    assert [s for s, _ in orphan.pending_ops()] == [1, 2, 3]
    orphan.ack([1, 2])  # the replay landed two, then died
    orphan.release()
    (orphan,) = list(orphans(tmp_path / "j"))
    assert [op["set"]["n"] for _, op in orphan.pending_ops()] == [2]
    orphan.release()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_acks_in_any_order_leave_exactly_the_unacknowledged_ops(tmp_path, seed):
    import random
    rnd = random.Random(seed)
    j = Journal(tmp_path / "j", segment_ops=3)
    seqs = [j.append({"kind": "set", "key_id": "a", "set": {"n": i}}) for i in range(40)]
    order = [s for s in seqs if s]
    rnd.shuffle(order)
    acked = set(order[:25])
    for i in range(0, 25, 4):  # batches of scattered seqs, as retries and shed ops make them
        j.ack(order[i:min(i + 4, 25)])
    assert j.pending == 40 - 25
    assert j.close() == 15
    (orphan,) = list(orphans(tmp_path / "j"))
    assert [s for s, _ in orphan.pending_ops()] == sorted(set(seqs) - acked)
    orphan.remove()


def test_segments_prepared_ahead_by_the_fsync_thread_keep_every_op_in_order(tmp_path):
    j = Journal(tmp_path / "j", fsync_interval_s=0.01, segment_ops=3)
    j.start()
    seqs = []
    for i in range(12):
        assert eventually(lambda: j._spare is not None, timeout=10)  # the next segment is ready off the loop
        seqs.append(j.append({"kind": "set", "key_id": "a", "set": {"n": i}}))
    j.ack(seqs[:5])
    assert j.close() == 7
    (orphan,) = list(orphans(tmp_path / "j"))
    assert [op["set"]["n"] for _, op in orphan.pending_ops()] == list(range(5, 12))
    assert len(orphan.segments()) == 3  # the first, fully acknowledged segment went; no empty spare is left
    orphan.remove()


def test_a_spare_overtaken_by_the_request_path_is_never_used(tmp_path, monkeypatch):
    """The fsync thread prepares segment n+1 while the request path, finding no spare, already opened
    n+2: using n+1 afterwards would put acks in an earlier segment than their ops (a prefix deletion
    could then bring acknowledged ops back on replay)."""
    import addon.store.journal as jm
    j = Journal(tmp_path / "j", segment_ops=2)
    seqs = [j.append({"kind": "set", "key_id": "a", "set": {"n": i}}) for i in range(2)]
    real = jm._open_segment

    def racing(path, index, size, mapped):
        if index == 1:  # the spare being prepared
            seqs.append(j.append({"kind": "set", "key_id": "a", "set": {"n": 2}}))  # rolls on its own meanwhile
        return real(path, index, size, mapped)

    monkeypatch.setattr(jm, "_open_segment", racing)
    j._prepare_spare()
    assert j._spare is None and j._cur is not None and j._cur.index == 2
    seqs += [j.append({"kind": "set", "key_id": "a", "set": {"n": i}}) for i in range(3, 6)]
    assert sorted(p.name for p in j.dir.glob("seg-*")) == ["seg-00000000.jsonl", "seg-00000002.jsonl",
                                                           "seg-00000003.jsonl"]
    j.ack(seqs[:3])
    assert j.close() == 3
    (orphan,) = list(orphans(tmp_path / "j"))
    assert [op["set"]["n"] for _, op in orphan.pending_ops()] == [3, 4, 5]
    orphan.remove()


def test_a_stop_with_ops_left_trims_the_segment_to_what_was_written(tmp_path):
    j = Journal(tmp_path / "j")
    j.append({"kind": "set", "key_id": "a", "set": {}})
    assert j.close() == 1
    (seg,) = (tmp_path / "j").glob("*/seg-*")
    assert b"\x00" not in seg.read_bytes() and seg.read_bytes().endswith(b"\n")


def test_a_clean_stop_with_everything_acknowledged_leaves_no_journal(tmp_path):
    j = Journal(tmp_path / "j")
    j.ack([j.append({"kind": "bind", "client_id": "c", "key_id": "a"})])
    assert j.close() == 0
    assert list((tmp_path / "j").iterdir()) == []


def test_torn_last_line_is_skipped_and_the_rest_replayed(tmp_path):
    j = Journal(tmp_path / "j")
    for i in range(3):
        j.append({"kind": "set", "key_id": "a", "set": {"n": i}})
    j.close()
    seg = next((tmp_path / "j").glob("*/seg-*"))
    with open(seg, "ab") as f:
        f.write(b'{"s":4,"op":{"kind":"se')  # killed in the middle of a write
    (orphan,) = list(orphans(tmp_path / "j"))
    assert [op["set"]["n"] for _, op in orphan.pending_ops()] == [0, 1, 2]
    orphan.release()


def test_size_cap_refuses_new_entries_loudly_and_recovers(tmp_path, caplog):
    j = Journal(tmp_path / "j", max_bytes=600, segment_ops=2)
    seqs = [j.append({"kind": "set", "key_id": "a", "set": {"pad": "x" * 40}}) for _ in range(12)]
    assert None in seqs and j.unjournaled > 0 and j.size_bytes <= 600
    assert "JOURNAL FULL" in caplog.text
    j.ack([s for s in seqs if s])
    assert j.append({"kind": "set", "key_id": "a", "set": {}}) is not None
    assert "room again" in caplog.text
    j.close()


def test_fsync_every_write_mode(tmp_path):
    j = Journal(tmp_path / "j", fsync_interval_s=0, segment_ops=2)
    seqs = [j.append({"kind": "set", "key_id": "a", "set": {}}) for _ in range(7)]
    assert seqs == list(range(1, 8)) and j._retired == []  # no descriptor left behind per segment
    j.ack(seqs[:4])
    assert j.close() == 3


# -- kill -9 with real MongoDB ---------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, {root!r})
    from addon.store.mongo import PoolStore
    from addon.store.writer import StoreWriter, usage_op
    store = PoolStore({uri!r}, {db!r}, timeout_ms=500)
    w = StoreWriter(store, Path({journal!r}))
    mode = {mode!r}
    if mode == "replay-crash":
        import addon.store.writer as wm
        real, calls = wm.apply_batch, [0]
        def dying(store, ops):
            calls[0] += 1
            if calls[0] == 3:  # half of the third batch lands, then the process dies
                real(store, ops[: len(ops) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            real(store, ops)
        wm.apply_batch = dying
        w.replay_journal()
        print("replay finished without dying", flush=True)
        sys.exit(3)
    if mode == "up":
        w.start()
    for i in range({n}):
        w.submit(usage_op("k%d" % (i % 2), 0.01, 7, 1000.0 + i, None, "op-%d" % i))
        if mode == "up" and i == {n} // 2:
            w.flush(10)  # half of them acknowledged by MongoDB before the kill
    print("queued", w.backlog, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def run_child(tmp_path: Path, uri: str, db: str, mode: str, n: int = 0) -> subprocess.CompletedProcess:
    code = CHILD.format(root=str(ROOT), uri=uri, db=db, journal=str(tmp_path / f"journal-{db}.jsonl"), mode=mode, n=n)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.fixture
def store(mongo, db_name):
    s = PoolStore(mongo.uri, db_name)
    for k in ("k0", "k1"):
        s.insert_key(new_key_doc(k, f"sk-{k}-journal-0123456789", 10.0, utcnow()))
    yield s
    s.close()


def totals(store: PoolStore) -> tuple[int, float]:
    docs = list(store.keys.find())
    return sum(d["requestsCount"] for d in docs), round(sum(d["spendEstimate"] for d in docs), 6)


@pytest.mark.parametrize("mode,uri_of", [
    ("up", lambda mongo: mongo.uri),  # killed while MongoDB takes writes: in-flight and queued ops
    ("down", lambda mongo: "mongodb://127.0.0.1:1/?directConnection=true"),  # killed during an outage
])
def test_kill_9_loses_nothing_and_replay_counts_once(tmp_path, mongo, db_name, store, mode, uri_of):
    n = 600
    child = run_child(tmp_path, uri_of(mongo), db_name, mode, n)
    assert child.returncode == -signal.SIGKILL, child.stderr
    if mode == "up":
        assert totals(store)[0] >= n // 2  # the first half reached MongoDB before the kill
    else:
        assert totals(store) == (0, 0.0)
    w = StoreWriter(store, tmp_path / f"journal-{db_name}.jsonl")
    w.replay_journal()
    assert totals(store) == (n, round(n * 0.01, 6))
    w.replay_journal()  # nothing left to replay; the orphan is gone
    assert totals(store) == (n, round(n * 0.01, 6))
    w.stop()
    assert list((tmp_path / f"journal-{db_name}").iterdir()) == []


def test_second_kill_during_replay_neither_loses_nor_doubles(tmp_path, mongo, db_name, store):
    n = 1000  # five replay batches; the replaying process dies in the middle of the third
    down = "mongodb://127.0.0.1:1/?directConnection=true"
    assert run_child(tmp_path, down, db_name, "down", n).returncode == -signal.SIGKILL
    child = run_child(tmp_path, mongo.uri, db_name, "replay-crash")
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    partial = totals(store)[0]
    assert 400 < partial < n  # two batches and a half landed
    w = StoreWriter(store, tmp_path / f"journal-{db_name}.jsonl")
    w.replay_journal()
    assert totals(store) == (n, round(n * 0.01, 6))
    w.stop()


def test_replay_with_mongodb_gone_moves_the_ops_into_the_new_journal(tmp_path, mongo, db_name, store):
    down = "mongodb://127.0.0.1:1/?directConnection=true"
    assert run_child(tmp_path, down, db_name, "down", 50).returncode == -signal.SIGKILL
    dead = PoolStore(down, db_name, timeout_ms=300)
    w = StoreWriter(dead, tmp_path / f"journal-{db_name}.jsonl")
    assert w.replay_journal() == 50 and w.pending_cost("k0") == pytest.approx(0.25)
    assert w.backlog == 52  # the 50 updates, and the re-check marks of the two keys that were in use
    w.stop(flush_timeout=0.5)  # still down at the stop: the ops stay in this process's journal
    dead.close()
    w2 = StoreWriter(store, tmp_path / f"journal-{db_name}.jsonl")
    w2.replay_journal()
    assert totals(store) == (50, 0.5)
    w2.stop()


def test_acknowledged_ops_leave_the_journal_while_running(tmp_path, store):
    w = StoreWriter(store, tmp_path / "journal-x.jsonl")
    w.start()
    for i in range(300):
        w.submit(usage_op("k0", 0.01, 1, 1000.0 + i, None, f"live-{i}"))
    assert w.flush(20)
    assert eventually(lambda: w.journal.pending == 0)
    w.stop()
    assert totals(store) == (300, 3.0)
    assert not (tmp_path / "journal-x").exists() or list((tmp_path / "journal-x").iterdir()) == []


def test_history_rows_replayed_twice_are_stored_once(tmp_path, store):
    w = StoreWriter(store, tmp_path / "journal-h.jsonl")
    op = {"kind": "history", "row": {"keyId": "k0", "spend": 1.0, "checkedAt": 1000.0}}
    w.submit(op)
    w.stop(flush_timeout=0.1)  # never started: the row is only in the journal
    saved = {k: v for k, v in op.items() if k != "_seq"}
    for _ in range(2):
        w2 = StoreWriter(store, tmp_path / "journal-h.jsonl")
        w2.submit(json.loads(json.dumps(saved)))  # the same row, journaled again (as after a crash mid-ack)
        w2.stop(flush_timeout=0.1)
    StoreWriter(store, tmp_path / "journal-h.jsonl").replay_journal()
    assert store.history.count_documents({"keyId": "k0"}) == 1


def test_keys_in_use_at_an_unclean_stop_are_rechecked_with_the_upstream_first(tmp_path, mongo, db_name, store):
    store.insert_key(new_key_doc("idle", "sk-idle-journal-0123456789", 10.0, utcnow()))
    checked = utcnow()
    store.keys.update_many({}, {"$set": {"lastSpendCheck": checked}})
    assert run_child(tmp_path, mongo.uri, db_name, "up", 40).returncode == -signal.SIGKILL  # k0 and k1 in use
    w = StoreWriter(store, tmp_path / f"journal-{db_name}.jsonl")
    w.replay_journal()
    assert w.recheck_keys == {"k0", "k1"}
    docs = {d["_id"]: d for d in store.keys.find()}
    assert docs["k0"]["lastSpendCheck"] is None and docs["k1"]["lastSpendCheck"] is None  # due at once
    assert docs["idle"]["lastSpendCheck"] is not None  # not in use at the stop: its schedule stands
    w.stop()
    w2 = StoreWriter(store, tmp_path / f"journal-{db_name}.jsonl")
    w2.replay_journal()  # a clean start after a clean stop re-checks nothing
    assert w2.recheck_keys == set()
    w2.stop()


@pytest.mark.parametrize("op", [
    USAGE,
    {**USAGE, "key_spend_floor": 12.345678901234567},
    {**USAGE, "key_id": 'odd "key" \\ ünïcødé \x00 \n'},
    {**USAGE, "cost": 3},  # not a float: the general encoder
    {**USAGE, "extra": 1},
    {**USAGE, "key_id": "lone \ud800 surrogate"},
    {**USAGE, "tokens": 2 ** 70},
])
def test_a_metered_answers_op_journaled_by_its_template_replays_as_any_op(tmp_path, op):
    """The request path journals usage ops by their own template: a replay reads them as the general ones."""
    j = Journal(tmp_path / "j")
    seqs = [j.append(op, usage=True), j.append(op)]
    assert j.close() == 2
    (orphan,) = list(orphans(tmp_path / "j"))
    (s1, got1), (s2, got2) = orphan.pending_ops()
    assert [s1, s2] == seqs and got1 == got2 == json.loads(encode_op(op))
    orphan.release()
