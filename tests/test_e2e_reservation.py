"""In-flight reservation end to end (issue 17): real mitmdump, real SecantusDB, the fake LiteLLM upstream.

- Concurrent requests near a key's rotation point do not overshoot it and produce no upstream budget error
  (on 1.80, where the upstream admits until the budget is spent, and on 1.110, whose own reservation
  refuses a second concurrent request on a nearly spent key as "busy"); the key's last cents are used.
- The metered spend equals the upstream's charge on 1.80 and on 1.110 (whose `x-litellm-key-spend` on
  JSON answers already includes the answer's cost): no request counted twice.
"""
from __future__ import annotations

import json
import threading

import pytest
import requests

from tests.harness import eventually
from tests.inproc import pools_on_one_database

pytestmark = pytest.mark.e2e

CLAUDE = "claude-sonnet-4-5"
GPT = "gpt-5-mini-2025-08-07"
USAGE = {"input": 10_000, "output": 1_333, "cache_read": 0, "cache_write": 0, "reasoning": 0}  # ~$0.05 on Sonnet
VERSIONS = ["1.80.0", "1.110.2"]


def pool_key(name: str) -> str:
    return f"sk-{name}-0123456789abcdef"


def set_version(upstream, version: str) -> None:
    upstream.litellm_version = version
    upstream.send_key_spend_header = True  # LiteLLM sends it on every answer
    upstream.reservations = version.startswith("1.110")  # on by default in 1.110


def chat(sc, client: str, stream: bool = False, **headers: str) -> requests.Response:
    body = {"model": CLAUDE, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return requests.post(sc.url + "/chat/completions", json=body, timeout=30,
                         headers={"x-litellm-session-id": client, "x-fake-usage": json.dumps(USAGE), **headers})


@pytest.mark.parametrize("version", VERSIONS)
def test_concurrent_requests_near_the_point_cause_no_budget_error(sidecar_factory, upstream, version):
    set_version(upstream, version)
    cost = upstream.cost_for(CLAUDE, USAGE)
    sc = sidecar_factory()
    upstream.add_key(pool_key("near"), budget=1.0, spend=0.45)
    sc.add_key("near", pool_key("near"), budget=1.0)
    r = sc.admin("PATCH", "/admin/openhands/keys/near/spend", {"spendEstimate": 0.45})
    assert r.status_code == 200, r.text
    clients = [f"conv-{i}" for i in range(6)]
    for c in clients:  # every conversation bound to the nearly spent key; the sidecar learns the cost
        assert chat(sc, c).status_code == 200
    eventually(lambda: abs(sc.keys()["near"]["spendEstimate"] - (0.45 + 6 * cost)) < 1e-6)
    upstream.add_key(pool_key("roomy"), budget=10.0)
    sc.add_key("roomy", pool_key("roomy"), budget=10.0)

    results: list[requests.Response] = []
    lock = threading.Lock()

    def conversation(c: str) -> None:
        for _ in range(4):  # streams that stay in flight for a while, all at once
            resp = chat(sc, c, stream=True, **{"x-fake-event-delay": "0.05", "x-fake-stream-events": "6"})
            with lock:
                results.append(resp)

    threads = [threading.Thread(target=conversation, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 24 and all(r.status_code == 200 for r in results), [r.text[:200] for r in results]
    assert upstream.budget_errors(pool_key("near")) == 0  # no budget error, no "busy" refusal, no retry
    assert sc.out.count(r"\[OpenHands/Retry\]") == 0
    spent = upstream.spend(pool_key("near"))
    # at most its last request past the budget (the upstream admits while spend < budget); unreserved
    # concurrency would have sent up to ~6 requests past it
    assert 0.04 < cost < 0.06 and spent < 1.0 + cost, f"the key overshot its budget: ${spent}"
    # its last cents were used too: past its point (0.95) it served one request at a time up to its budget
    assert spent >= 1.0 - 0.001 - 1e-9
    assert chat(sc, clients[0]).status_code == 200  # its next request rotates it: nothing left to drain
    eventually(lambda: sc.keys()["near"]["status"] == "exhausted")
    assert upstream.budget_errors(pool_key("near")) == 0
    eventually(lambda: abs(sc.keys()["near"]["spendEstimate"] - spent) < 1e-6)  # metered as charged


@pytest.mark.parametrize("version", VERSIONS)
def test_metered_spend_equals_the_upstream_charge(sidecar_factory, upstream, version):
    set_version(upstream, version)
    sc = sidecar_factory()
    upstream.add_key(pool_key("m1"), budget=10.0, spend=1.25)  # spend from before this sidecar knew the key
    sc.add_key("m1", pool_key("m1"), budget=10.0)
    r = sc.admin("PATCH", "/admin/openhands/keys/m1/spend", {"spendEstimate": 1.25})
    assert r.status_code == 200, r.text
    bodies = [
        ("/chat/completions", {"model": CLAUDE, "messages": []}),
        ("/chat/completions", {"model": CLAUDE, "messages": [], "stream": True}),
        ("/v1/messages", {"model": CLAUDE, "max_tokens": 5, "messages": []}),
        ("/v1/messages", {"model": CLAUDE, "max_tokens": 5, "messages": [], "stream": True}),
        ("/responses", {"model": GPT, "input": "hi"}),
        ("/responses", {"model": GPT, "input": "hi", "stream": True}),
    ]
    for i in range(12):
        path, body = bodies[i % len(bodies)]
        resp = requests.post(sc.url + path, json=body, timeout=30, headers={"x-litellm-session-id": "one"})
        assert resp.status_code == 200, resp.text
    charged = upstream.spend(pool_key("m1"))
    assert charged > 1.25
    # the sidecar's figure (memory and MongoDB) is the upstream's: never one response's cost too high
    eventually(lambda: abs(sc.keys()["m1"]["spendEstimate"] - charged) < 1e-6)


def test_budget_changed_upstream_is_picked_up(sidecar_factory, upstream):
    set_version(upstream, "1.80.0")
    sc = sidecar_factory()
    upstream.add_key(pool_key("b1"), budget=10.0)
    sc.add_key("b1", pool_key("b1"), budget=10.0)
    upstream.set_budget(pool_key("b1"), 25.0)  # an operator raised it on the proxy
    assert chat(sc, "x").status_code == 200
    eventually(lambda: sc.keys()["b1"]["budgetLimit"] == 25.0)


def test_peers_see_each_others_reservations_and_a_dead_sidecar_leaks_none(mongo_db):
    """Shared through MongoDB (real SecantusDB): one document per key, one entry per sidecar holding its
    own totals (`$set`, so no drift); an entry not refreshed within the TTL is ignored."""
    from addon.core.reservation import KeyLoad
    from addon.store.reservations import ReservationStore

    a, b, c = (ReservationStore(mongo_db, name, ttl_s=30) for name in ("side-a", "side-b", "side-c"))
    a.ensure_indexes()
    now = 1_000_000.0
    a.publish({"k1": KeyLoad(0.2, 1, 0.1), "k2": KeyLoad(0.05, 1)}, now)
    b.publish({"k1": KeyLoad(0.3, 2)}, now)
    assert c.peers(now + 1) == {"k1": KeyLoad(pytest.approx(0.5), 3, pytest.approx(0.1)),
                                "k2": KeyLoad(pytest.approx(0.05), 1)}
    assert a.peers(now + 1) == {"k1": KeyLoad(pytest.approx(0.3), 2)}          # never its own
    a.publish({"k1": KeyLoad(), "k2": KeyLoad()}, now + 2)                     # settled: zeros, not a drift
    assert c.peers(now + 3) == {"k1": KeyLoad(pytest.approx(0.3), 2), "k2": KeyLoad()}  # a: alive, holds nothing
    assert c.peers(now + 31) == {"k1": KeyLoad(), "k2": KeyLoad()}             # b died: its load is ignored
    assert c.peers(now + 33) == {}                                             # and a's zeros age out too
    a.publish({"k1": KeyLoad(0.1, 1)}, now + 40)                               # a lives on; b's entry is dead
    assert c.peers(now + 41) == {"k1": KeyLoad(pytest.approx(0.1), 1)} and c.prune(now + 41) == 1
    assert mongo_db.openhands_reservations.find_one({"_id": "key:k1"})["by"].keys() == {"side-a"}
    b.withdraw()
    assert mongo_db.openhands_reservations.count_documents({"by.side-b": {"$exists": True}}) == 0


def test_a_peers_fresh_spend_comes_back_in_parts_under_its_writer_id_and_junk_is_left_out(mongo_db):
    """The parts say which op each dollar came from (the reader matches them with the key document's
    landed ranges); the writer is the sidecar whose entry they were read from, never what the entry says."""
    from addon.core.reservation import KeyLoad
    from addon.store.reservations import ReservationStore

    a, c = ReservationStore(mongo_db, "side-a"), ReservationStore(mongo_db, "side-c")
    now = 1_000_000.0
    a.publish({"k1": KeyLoad(recent=0.5, parts=(("", 7, 0.2), ("", 9, 0.3)))}, now)
    assert c.peers(now + 1)["k1"].parts == (("side-a", 7, 0.2), ("side-a", 9, 0.3))
    mongo_db.openhands_reservations.update_one({"_id": "key:k1"}, {"$set": {"by.side-a.parts": [
        [True, 0.1], [-1, 0.1], "x", [3, "junk"], [4, 0.1, 9], [5, float("nan")]]}})
    assert c.peers(now + 1)["k1"].parts == (("side-a", 3, 0.0), ("side-a", 5, 0.0))
    assert c.peers(now + 1)["k1"].recent == pytest.approx(0.5)   # the junk parts leave it all counted
    mongo_db.openhands_reservations.update_one({"_id": "key:k1"}, {"$unset": {"by.side-a.parts": ""}})
    older = c.peers(now + 1)["k1"]                                 # as a sidecar of an older version writes it
    assert (older.recent, older.parts, older.legacy) == (0.0, (), pytest.approx(0.5))


# -- several sidecars near a key's point (two `Pool`s on one real SecantusDB database) -----------------
@pytest.fixture
def two_pools(mongo, db_name, tmp_path):
    from addon.store.mongo import new_key_doc, utcnow

    with pools_on_one_database(mongo.uri, db_name, tmp_path, 2) as pools:
        for key_id, spend in (("near", 9.30), ("roomy", 1.0)):
            assert pools[0].store.insert_key({**new_key_doc(key_id, pool_key(key_id), 10.0, utcnow()),
                                              "spendEstimate": spend})
        for p in pools:
            p.sync()
            p.reserve("warm-up", "roomy", "warm-up", None)  # each sidecar's sharer starts and publishes
            p.release("warm-up")
        eventually(lambda: all(p.peer_loads for p in pools))  # each sees the other at work
        yield pools


def test_a_peers_fresh_spend_counts_once_before_and_after_our_sync_reads_it(two_pools):
    """Peer b counts a's new charge at once (a key it takes past its point rotates on b too), and once
    b's copy of the key holds a's landed write, b stops counting it separately: never twice, never lost."""
    a, b = two_pools
    b.sync()
    a.reserve("f1", "roomy", "c1", None)
    a.record_usage("roomy", 0.4, 10, client_id="c1", flow_id="f1")

    def b_counts() -> float:
        key = b.get("roomy")
        assert key is not None
        return key.effective_spend + key.peer_unsynced

    eventually(lambda: b_counts() == pytest.approx(1.4))      # before b reads it from the key's document
    assert b.get("roomy").spend_estimate == pytest.approx(1.0)  # (a's spend is not in b's copy yet)
    assert a.writer.flush(10)

    def synced_once() -> bool:
        b.sync()
        key = b.get("roomy")
        return key.spend_estimate == pytest.approx(1.4) and key.peer_unsynced == 0.0

    eventually(synced_once)                                   # in b's copy now, and not counted again
    assert b_counts() == pytest.approx(1.4)


@pytest.mark.parametrize("rounds", range(3))
def test_racing_sidecars_never_admit_more_than_a_nearly_spent_key_can_pay_for(two_pools, rounds):
    """$9.30 of $10 spent, point $9.95, every request ~$0.20: at most three may be in flight at once on
    the key (a fourth would pass the budget with LiteLLM's $0.25 per-request hold, and fill the point).
    Eight requests, four per sidecar, choose a key at the same instant: the others go to the roomy key."""
    import uuid

    clients = []
    for n, p in enumerate(two_pools):
        for i in range(4):
            client = f"conv-{rounds}-{n}-{i}"
            p.estimator.observe(client, CLAUDE, 0.20)
            p.bind(client, "near")
            clients.append((p, client))
    got: list[tuple[str | None, bool]] = []
    lock = threading.Lock()
    start = threading.Barrier(len(clients))

    def send(p, client: str) -> None:
        start.wait()
        acquired = p.acquire(client)
        if acquired.key is not None and not acquired.full:
            p.reserve(uuid.uuid4().hex, acquired.key.id, client, CLAUDE)  # in flight until the test ends
        with lock:
            got.append((acquired.key.id if acquired.key else None, acquired.full))

    threads = [threading.Thread(target=send, args=c) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sent_near = sum(1 for key_id, full in got if key_id == "near" and not full)
    assert len(got) == 8
    assert 1 <= sent_near <= 3, got
    assert all(key_id == "roomy" for key_id, full in got if not (key_id == "near")), got
    assert all(p.bindings[c] == "near" for p, c in clients)  # conversations keep their key (prompt cache)
