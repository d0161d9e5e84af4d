"""The write-behind batch: fewer round trips, same result, exactly once under retries and replays."""
from __future__ import annotations

import pytest

from addon.store.mongo import PoolStore, new_key_doc, utcnow
from addon.store.writer import apply_batch, apply_op, plan_batch, usage_op


def usage(key: str, cost: float, n: int) -> dict:
    return usage_op(key, cost, 10, 1000.0 + n, None, f"{key}-{n}")


def test_plan_merges_usage_per_key_but_not_across_a_set_for_that_key():
    ops = [usage("a", 0.1, 1), usage("b", 0.2, 2), usage("a", 0.3, 3),
           {"kind": "set", "key_id": "a", "set": {"status": "healthy"}},
           usage("a", 0.5, 4),
           {"kind": "bind", "client_id": "c", "key_id": "a"}, {"kind": "bind", "client_id": "c", "key_id": "b"}]
    writes, binds, history = plan_batch(ops)
    assert [(kind, w.get("key_id"), w.get("ids")) for kind, w in writes] == [
        ("usage", "a", ["a-1", "a-3"]), ("usage", "b", ["b-2"]), ("set", "a", None), ("usage", "a", ["a-4"])]
    assert writes[0][1]["cost"] == pytest.approx(0.4) and writes[0][1]["count"] == 2
    assert binds == {"c": "b"} and history == []


@pytest.fixture
def store(mongo, db_name):
    s = PoolStore(mongo.uri, db_name)
    s.insert_key(new_key_doc("a", "sk-a-0123456789abcdef", 10.0, utcnow()))
    s.insert_key(new_key_doc("b", "sk-b-0123456789abcdef", 10.0, utcnow()))
    yield s
    s.close()


def test_batch_applies_like_single_ops_and_exactly_once(store):
    ops = [usage("a", 0.1, i) for i in range(50)] + [usage("b", 0.25, i) for i in range(4)]
    apply_batch(store, ops)
    apply_batch(store, ops)  # a retry of the same batch after a lost acknowledgement
    for op in ops:  # and a journal replay of the very same ops, one by one
        apply_op(store, op)
    a, b = store.get_key("a"), store.get_key("b")
    assert a["spendEstimate"] == pytest.approx(5.0) and a["requestsCount"] == 50 and a["tokensUsed"] == 500
    assert b["spendEstimate"] == pytest.approx(1.0) and b["requestsCount"] == 4


def test_batch_binds_and_raise_spend(store):
    apply_batch(store, [{"kind": "bind", "client_id": "c1", "key_id": "a"},
                        {"kind": "raise_spend", "key_id": "b", "spend": 3.0, "set": {"totalSpend": 3.0}},
                        {"kind": "raise_spend", "key_id": "b", "spend": 2.0, "set": {"totalSpend": 2.0}}])
    assert store.bindings.find_one({"clientId": "c1"})["openhandsKeyId"] == "a"
    b = store.get_key("b")
    assert b["spendEstimate"] == 3.0  # spend only grows
    assert b["totalSpend"] == 2.0  # the last authoritative reading


# -- how a landed write is remembered: id ranges per writer prefix (one small entry per merged write) ----
@pytest.mark.parametrize("ids, expected", [
    (["0a1b-4", "0a1b-9", "0a1b-6"], {"appliedRanges": {"$each": [{"p": "0a1b", "a": 4, "b": 9}], "$slice": -32}}),
    (["old-3", "new-1", "old-5"], {"appliedRanges": {"$each": [{"p": "old", "a": 3, "b": 5},
                                                                {"p": "new", "a": 1, "b": 1}], "$slice": -32}}),
    (["x1", "x-2"], {"appliedOps": {"$each": ["x1", "x-2"], "$slice": -256}}),   # an id without a sequence
])
def test_usage_record(ids, expected):
    from addon.store.mongo import usage_record
    assert usage_record(ids) == expected


@pytest.mark.parametrize("op_id, expected", [
    ("0123456789abcdef-42", ("0123456789abcdef", 42)), ("a-b-7", ("a-b", 7)), ("floor", None), ("-3", None),
    ("k-", None), ("k-1e3", None), ("k-" + "9" * 30, None),
])
def test_op_position(op_id, expected):
    from addon.store.mongo import op_position
    assert op_position(op_id) == expected


@pytest.mark.parametrize("doc,marks", [
    ({}, {}),
    ({"appliedRanges": [{"p": "w", "a": 3, "b": 5}, {"p": "w", "a": 8, "b": 9}, {"p": "v", "a": 1, "b": 2}]},
     {"w": 9, "v": 2}),
    ({"appliedRanges": [{"p": "w", "a": 8, "b": 9}, {"p": "w", "a": 3, "b": 5}]}, {"w": 9}),   # any order
    ({"appliedRanges": [{"p": "w", "a": 1, "b": "9"}, {"p": 3, "a": 1, "b": 4}, "junk"]}, {}),  # junk is ignored
    ({"appliedRanges": "junk"}, {}),
])
def test_writer_marks_say_up_to_which_op_each_writer_is_in_a_key(doc, marks):
    from addon.store.mongo import writer_marks
    assert writer_marks(doc) == marks


def test_landed_ids_reads_both_forms():
    from addon.store.mongo import landed_ids
    doc = {"appliedOps": ["legacy-1", "odd"], "appliedRanges": [{"p": "w", "a": 3, "b": 5}, {"p": "v", "a": 9, "b": 9},
                                                                 {"p": "w", "a": "junk", "b": 7}]}
    assert landed_ids(doc, ["legacy-1", "odd", "w-2", "w-3", "w-5", "w-6", "v-9", "u-4"]) == {
        "legacy-1", "odd", "w-3", "w-5", "v-9"}


def test_a_replay_that_regroups_ops_applies_only_those_that_never_landed(store):
    from addon.store.writer import drop_applied
    ops = [usage("a", 0.1, i) for i in range(10)]
    apply_batch(store, ops[:6])                       # the in-flight batch landed, its acknowledgement was lost
    apply_batch(store, drop_applied(store, ops))      # the journal replays all ten, grouped differently
    a = store.get_key("a")
    assert a["spendEstimate"] == pytest.approx(1.0) and a["requestsCount"] == 10
    raw = store.keys.find_one({"_id": "a"})
    assert len(raw["appliedRanges"]) == 2 and "appliedOps" not in raw   # two small entries for ten ops
