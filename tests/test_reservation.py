"""In-flight reservation: the pure rules (core.reservation) and the pool's use of them (memory store)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.core import reservation as rsv
from addon.core.reservation import KeyLoad, admits, header_spend_floor, spend_is_after

POINT, BUDGET = 9.95, 10.0


@pytest.mark.parametrize("spend, load, expected, why", [
    (5.00, KeyLoad(), True, "plenty left, nothing in flight"),
    (9.94, KeyLoad(), True, "below the point with nothing in flight: the last cents are used"),
    (9.95, KeyLoad(), False, "at the point"),
    (9.70, KeyLoad(0.20, 1), True, "spend + reservation still below the point"),
    (9.80, KeyLoad(0.20, 1), False, "spend + reservation reach the point: the key is full for now"),
    (9.50, KeyLoad(0.30, 2, recent=0.20), False, "a peer's fresh spend counts until our copy shows it"),
    (9.80, KeyLoad(0.10, 1), False, "less than one request's maximum left: one request at a time"),
    (9.76, KeyLoad(0.05, 1), False, "one in flight holds up to 0.25 upstream: a second would be refused as busy"),
    (9.74, KeyLoad(0.05, 1), True, "one in flight and room for its whole upstream reservation"),
    (9.40, KeyLoad(0.30, 2), True, "two in flight, room for their maximum reservations"),
    (9.30, KeyLoad(0.30, 3), False, "three maximum reservations would fill the budget"),
])
def test_admits(spend: float, load: KeyLoad, expected: bool, why: str) -> None:
    assert admits(spend, BUDGET, POINT, load) is expected, why


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_admits_ignores_junk_numbers(bad: float) -> None:
    assert admits(5.0, BUDGET, POINT, KeyLoad(bad, 0, bad)) is True


@pytest.mark.parametrize("headers, streamed, version, expected", [
    ({}, True, "1.110.2", False),                                    # streams: spend before, every version
    ({}, False, "1.110.2", True),                                    # 1.110 JSON: spend after
    ({}, False, "1.80.0", False),
    ({}, False, "1.105.7", False),
    ({}, False, "v1.111.0", True),
    ({"x-litellm-response-cost-input": "0.1"}, False, None, True),   # no version header: per-part costs = 1.110
    ({"x-litellm-response-cost": "0.1"}, False, None, None),         # nothing tells: unknown
    ({}, False, "garbage", None),
])
def test_spend_is_after(headers: dict, streamed: bool, version: str | None, expected: bool | None) -> None:
    assert spend_is_after(headers, streamed, version) is expected


@pytest.mark.parametrize("header, cost, after, expected", [
    (5.0, 0.1, False, 5.1),     # before: header + this response
    (5.1, 0.1, True, 5.1),      # after: the header already holds it (no double count)
    (5.0, 0.1, None, 5.0),      # unknown: the header alone is a floor on both versions
    (None, 0.1, False, None),
    (float("nan"), 0.1, False, None),
    (-1.0, 0.1, True, None),
])
def test_header_spend_floor(header, cost, after, expected) -> None:
    got = header_spend_floor(header, cost, after)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_estimator_uses_client_then_model_then_default() -> None:
    est = rsv.CostEstimator(default=0.25, history=3)
    assert est.estimate("a", "m") == 0.25
    est.observe("a", "m", 0.05)
    est.observe("a", "m", 0.12)
    assert est.estimate("a", "m") == 0.12
    assert est.estimate("b", "m") == 0.12           # a new client of a known model: the model's figure
    assert est.estimate("b", "other") == 0.25
    for c in (0.01, 0.02, 0.03):                    # only the last few costs count
        est.observe("a", "m", c)
    assert est.estimate("a", "m") == 0.03
    est.observe("a", "m", float("nan"))
    assert est.estimate("a", "m") == 0.03


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["m", "n", None]),
                          st.floats(min_value=0, max_value=1, allow_nan=False)), max_size=60))
def test_estimator_figures_are_the_largest_of_the_last_few_costs(seen) -> None:
    """The estimates kept up to date on observe equal the plain rule, recomputed from the whole history."""
    est = rsv.CostEstimator(default=0.25, history=3)
    for client, model, cost in seen:
        est.observe(client, model, cost)
    for client in "abcd":
        for model in ("m", "n", None, "x"):
            mine = [c for cl, mo, c in seen if cl == client and (mo or "") == (model or "")][-3:]
            models = [c for _, mo, c in seen if (mo or "") == (model or "")][-12:]
            assert est.estimate(client, model) == (max(mine) if mine else max(models) if models else 0.25)
        anyone = [c for cl, _, c in seen if cl == client][-3:]
        everyone = [c for _, _, c in seen][-12:]
        assert est.estimate_client(client) == (max(anyone) if anyone else max(everyone) if everyone else 0.25)


def test_estimator_memory_is_bounded() -> None:
    est = rsv.CostEstimator(max_clients=10)
    for i in range(100):
        est.observe(f"c{i}", "m", 0.1)
    assert len(est._by_client) == 10 and len(est._any_model) == 10


def test_book_reserve_move_release_never_leaks() -> None:
    book = rsv.ReservationBook(ttl_s=60)
    book.reserve("f1", "k1", 0.2, now=0)
    book.reserve("f2", "k1", 0.1, now=0)
    assert book.load("k1") == KeyLoad(pytest.approx(0.3), 2)
    book.reserve("f1", "k2", 0.2, now=1)            # a retry moves the flow's reservation
    assert book.load("k1") == KeyLoad(pytest.approx(0.1), 1) and book.load("k2").in_flight == 1
    assert book.release("f2") == "k1" and book.release("f2") is None   # idempotent
    assert book.load("k1") == KeyLoad()
    assert book.sweep(now=100) == 1 and len(book) == 0                 # a flow whose end was never seen


def test_book_recent_spend_lasts_until_written_and_read() -> None:
    book = rsv.ReservationBook()
    book.settled("k1", 0.2, now=0, window_s=3)
    unwritten = {"k1": 0.2}
    assert book.loads(now=10, window_s=3, unwritten=unwritten.get)["k1"].recent == pytest.approx(0.2)
    unwritten["k1"] = 0.0                                        # the write-behind wrote it at t=11
    assert book.loads(now=11, window_s=3, unwritten=unwritten.get)["k1"].recent == pytest.approx(0.2)
    assert "k1" in book.loads(now=13.5, window_s=3, unwritten=unwritten.get)
    assert "k1" not in book.loads(now=14.5, window_s=3, unwritten=unwritten.get)


def test_book_publishes_its_fresh_spend_in_parts_by_op_sequence_number() -> None:
    """A peer must know which of our fresh costs its copy of the key already holds: each landed write
    (the writer stamps its usage ops) is one part with the last sequence number in it, each cost not
    written yet its own part."""
    book = rsv.ReservationBook()
    op1: dict = {"kind": "usage"}
    op2: dict = {"kind": "usage"}
    op3: dict = {"kind": "usage"}
    book.settled("k1", 0.2, now=0, window_s=6, op=op1, seq=7)
    book.settled("k1", 0.3, now=0.5, window_s=6, op=op2, seq=9)
    book.settled("k1", 0.1, now=0.6, window_s=6, op=op3, seq=12)
    book.settled("k1", 0.05, now=0.7, window_s=6)              # no sequence number: in no part
    pending = {"k1": 0.65}
    load = book.loads(now=1, window_s=6, unwritten=pending.get)["k1"]
    assert load.recent == pytest.approx(0.65)
    assert load.parts == (("", 7, 0.2), ("", 9, 0.3), ("", 12, 0.1))
    op1["landed_at"] = op2["landed_at"] = 1.5                   # one write carried the first two
    load = book.loads(now=2, window_s=6, unwritten=pending.get)["k1"]
    assert load.parts == (("", 9, pytest.approx(0.5)), ("", 12, 0.1))
    op3["landed_at"] = 2.5
    assert book.loads(now=3, window_s=6)["k1"].parts == (("", 9, pytest.approx(0.5)), ("", 12, 0.1))
    load = book.loads(now=9, window_s=6, unwritten=lambda _k: 0.0)["k1"]  # landed more than the window ago:
    assert load == KeyLoad(recent=pytest.approx(0.05))                        # only the last (written now) is left
    assert "k1" not in book.loads(now=16, window_s=6)


@pytest.mark.parametrize("load,marks,unsynced,why", [
    (KeyLoad(recent=0.5), {"p": 100}, 0.5, "in no part: all of it counts"),
    (KeyLoad(recent=0.5, parts=(("p", 9, 0.2),)), {"p": 9}, 0.3, "our copy holds that part"),
    (KeyLoad(recent=0.5, parts=(("p", 9, 0.2),)), {"p": 8}, 0.5, "our copy predates it"),
    (KeyLoad(recent=0.5, parts=(("p", 9, 0.2),)), {"q": 50}, 0.5, "another writer's ops say nothing of p's"),
    (KeyLoad(recent=0.5, parts=(("p", 9, 0.2), ("q", 3, 0.3))), {"p": 9, "q": 3}, 0.0, "all of it read already"),
    (KeyLoad(recent=0.1, parts=(("p", 9, 0.2),)), {"p": 9}, 0.0, "never below zero"),
    (KeyLoad(recent=float("nan")), {}, 0.0, "junk counts as nothing"),
])
def test_a_peers_unsynced_spend_leaves_out_what_our_copy_holds(load, marks, unsynced, why) -> None:
    assert load.unsynced(marks) == pytest.approx(unsynced), why


def test_a_peer_load_sum_keeps_every_part() -> None:
    a = KeyLoad(0.1, 1, 0.2, (("p", 4, 0.2),))
    b = KeyLoad(0.0, 0, 0.3, (("q", 6, 0.1),))
    assert (a + b).parts == (("p", 4, 0.2), ("q", 6, 0.1)) and (a + b).unsynced({"p": 4}) == pytest.approx(0.3)
    assert a.without(0.1).parts == a.parts


def test_many_parts_merge_into_later_ones_never_earlier() -> None:
    """Bounded publication: the oldest parts merge into the next one, so a reader counts them a little
    longer (never too little)."""
    book = rsv.ReservationBook()
    for i in range(rsv.MAX_PARTS + 4):
        book.settled("k1", 0.1, now=float(i), window_s=60, op={"landed_at": float(i)}, seq=i)
    load = book.loads(now=40, window_s=60)["k1"]
    assert len(load.parts) == rsv.MAX_PARTS
    assert sum(a for _, _, a in load.parts) == pytest.approx(load.recent)
    marked = [(w or "p", s, a) for w, s, a in load.parts]
    assert KeyLoad(recent=load.recent, parts=tuple(marked)).unsynced({"p": 3}) == pytest.approx(load.recent)
    assert KeyLoad(recent=load.recent, parts=tuple(marked)).unsynced({"p": 4}) == pytest.approx(load.recent - 0.5)


def test_a_busy_keys_unwritten_costs_merge_before_any_landed_write_does() -> None:
    """A hot key has more costs waiting for the write-behind than parts to publish: those merge among
    themselves, so a reader whose copy holds the landed writes never counts them again."""
    book = rsv.ReservationBook()
    seq = 0
    for write in range(3):                                     # three landed writes of two costs each
        for _ in range(2):
            seq += 1
            book.settled("k1", 0.5, now=float(seq), window_s=60, op={"landed_at": 10.0 + write}, seq=seq)
    for _ in range(2 * rsv.MAX_PARTS):                         # and many costs not written yet
        seq += 1
        book.settled("k1", 0.01, now=float(seq), window_s=60, op={}, seq=seq)
    load = book.loads(now=20, window_s=60)["k1"]
    assert len(load.parts) <= rsv.MAX_PARTS
    assert load.parts[:3] == (("", 2, 1.0), ("", 4, 1.0), ("", 6, 1.0))
    marked = KeyLoad(recent=load.recent, parts=tuple(("p", s, a) for _, s, a in load.parts))
    assert marked.unsynced({"p": 6}) == pytest.approx(2 * rsv.MAX_PARTS * 0.01)  # only what is not written


def _parts_pairwise(dq) -> tuple:
    """The plain statement of `_parts`: every cost in order, landed ones of one write together, then the oldest
    pair merged (first two costs not written yet, else the first two parts) until MAX_PARTS are left."""
    import math
    parts: list[list] = []
    for e in dq:
        at, cost, seq = e[2], e[1], e[4]
        if seq < 0:
            continue
        if parts and at != math.inf and parts[-1][0] == at:
            parts[-1][1], parts[-1][2] = max(parts[-1][1], seq), parts[-1][2] + cost
        else:
            parts.append([at, seq, cost])
    while len(parts) > rsv.MAX_PARTS:
        i = next((j for j in range(len(parts) - 1) if parts[j][0] == math.inf), 0)
        (_, s1, a), (at, s2, b) = parts[i], parts[i + 1]
        parts[i:i + 2] = [[at, max(s1, s2), a + b]]
    return tuple(("", int(s), float(a)) for _, s, a in parts)


_INF = float("inf")
_ENTRY = st.tuples(st.sampled_from([1.0, 2.0, 3.0, _INF, _INF, float("nan")]),   # landed at (inf: not yet)
                   st.sampled_from([0.01, 0.1, 0.3, 1e-9, 2.5]),                 # dollars
                   st.integers(-1, 400))                                         # op sequence number (-1: none)


@settings(max_examples=600, deadline=None)
@given(st.integers(0, 3 * rsv.MAX_PARTS).flatmap(lambda n: st.lists(_ENTRY, min_size=n, max_size=n)), st.booleans())
def test_published_parts_are_the_pairwise_merge_of_every_cost(entries, ordered) -> None:
    """A hot key's publication reads its whole window at once (the tail of costs not written yet merged in
    one step): always the parts the pairwise merge gives, whatever the order of landings and numbers."""
    if ordered:  # the usual layout: landed writes in order, then the costs not written yet, numbers rising
        entries = sorted(entries, key=lambda e: (e[0] == _INF, e[0] if e[0] == e[0] else 0.0))
        entries = [(at, cost, i) for i, (at, cost, _) in enumerate(entries)]
    dq = [[0.0, cost, at, None, seq] for at, cost, seq in entries]
    assert rsv._parts(dq) == _parts_pairwise(dq)


@pytest.mark.parametrize("value, expected", [
    ("1.110.2", (1, 110, 2)), ("1.80.0", (1, 80, 0)), (" v1.81", (1, 81, 0)), ("1.80.0-stable", (1, 80, 0)),
    ("", None), (None, None), ("junk", None), ("v", None), ("12345.1", None),
])
def test_a_version_header_reads_the_same_however_often_it_comes(value, expected) -> None:
    """LiteLLM sends one version on every answer: it is read once and remembered, the answer unchanged."""
    assert rsv.parse_version(value) == expected
    assert rsv.parse_version(value) == expected


def test_version_memory_is_bounded_and_later_versions_still_read() -> None:
    for i in range(rsv._VERSIONS_CAP + 50):
        assert rsv.parse_version(f"1.{i}.7") == (1, i, 7)
    assert len(rsv._VERSIONS) <= rsv._VERSIONS_CAP


# -- the pool: Pool.acquire is where the rule applies ---------------------------------------------------
@pytest.fixture
def pool(tmp_path):
    from addon.pool.pool import Pool
    from addon.store.mongo import new_key_doc, utcnow
    from tests.memory_store import MemoryStore, make_writer

    store = MemoryStore()
    p = Pool(store, make_writer(store, tmp_path / "journal.jsonl"), threshold=lambda: 9.95,
             default_budget=lambda: 10.0)
    for key_id, spend in (("k1", 9.70), ("k2", 1.0)):
        assert store.insert_key({**new_key_doc(key_id, f"sk-{key_id}-0123456789abcdef", 10.0, utcnow()),
                                 "spendEstimate": spend})
    p.sync()
    return p


def test_full_key_spills_to_another_without_rebinding(pool) -> None:
    pool.bind("client", "k1")
    first = pool.acquire("client")
    assert first.key.id == "k1"
    pool.reserve("flow-1", "k1", "client", None)     # default estimate 0.25: 9.70 + 0.25 reaches 9.95
    second = pool.acquire("client")
    assert second.key.id == "k2" and not second.full
    assert pool.bindings["client"] == "k1"           # the conversation keeps its key (prompt cache)
    pool.release("flow-1")
    assert pool.acquire("client").key.id == "k1"     # settled: the key serves again, not retired
    assert pool.get("k1").status == "healthy"


def test_every_key_full_says_so(pool) -> None:
    pool.reserve("a", "k1", "c", None)
    for i in range(40):
        pool.reserve(f"b{i}", "k2", "c", None)
    got = pool.acquire("c")
    assert got.key is not None and got.full


def test_metered_header_on_1110_json_is_not_counted_twice(pool) -> None:
    before = pool.get("k2").spend_estimate
    pool.record_usage("k2", 0.1, 10, before + 0.1, spend_is_after=True)
    assert pool.get("k2").spend_estimate == pytest.approx(before + 0.1)
    pool.record_usage("k2", 0.1, 10, before + 0.1, spend_is_after=False)   # stream / 1.80: header is before
    assert pool.get("k2").spend_estimate == pytest.approx(before + 0.2)


def test_upstream_budget_header_updates_the_key(pool) -> None:
    pool.record_usage("k2", 0.1, 10, None, max_budget=25.0)
    assert pool.get("k2").budget_limit == 25.0
    pool.record_usage("k2", 0.1, 10, None, max_budget=float("inf"))
    assert pool.get("k2").budget_limit == 25.0


# -- near the point with peers at work: claims (issue 17, several sidecars) -----------------------------
@pytest.mark.parametrize("spend, held, estimate, expected", [
    (5.00, 0.0, 0.20, False),                 # far: admitted from memory, no database step
    (8.30, 0.0, 0.20, False),                 # 1.65 left: more than eight requests' worth
    (8.40, 0.0, 0.20, True),                  # within eight estimates of the point
    (8.00, 0.40, 0.20, True),                 # reservations and peers' fresh spend count
    (8.00, 0.0, float("nan"), True),          # junk estimate: the default (0.25) per request
    (8.00, float("nan"), 0.20, False),        # junk reservation figure: ignored
])
def test_near_point(spend, held, estimate, expected) -> None:
    assert rsv.near_point(spend, POINT, held, estimate) is expected


def test_estimate_before_the_model_is_known() -> None:
    est = rsv.CostEstimator(default=0.25)
    assert est.estimate_client("a") == 0.25
    est.observe("b", "m1", 0.05)
    assert est.estimate_client("a") == 0.05           # a new client: everyone's recent costs
    est.observe("a", "m1", 0.04)
    est.observe("a", "m2", 0.15)
    assert est.estimate_client("a") == 0.15           # the client's largest, whatever the model


def test_book_claim_is_taken_over_by_the_request_or_expires() -> None:
    book = rsv.ReservationBook()
    c1 = book.claim("client", "k1", 0.2, now=0)
    assert book.load("k1") == KeyLoad(pytest.approx(0.2), 1)
    assert book.adopt("flow-1", "client", "k1", 0.1, now=1)           # the claim becomes the flow's
    assert book.load("k1") == KeyLoad(pytest.approx(0.2), 1)          # never dropped, never doubled
    assert not book.adopt("flow-2", "client", "k1", 0.1, now=1)       # one claim, one request
    book.release("flow-1")
    assert book.load("k1") == KeyLoad() and book.holds(c1) is None
    c2 = book.claim("client", "k1", 0.2, now=10)
    book.unclaim(c2, "client", "k1")                                  # refused: it ends at once
    assert book.load("k1") == KeyLoad()
    book.claim("client", "k1", 0.2, now=20)                           # the request never went out
    assert book.loads(now=20 + rsv.CLAIM_TTL_S + 1, window_s=3) == {}


class StubSharer:
    """Stands in for the database step: the peers' load on the key as read at the claim (None = no answer)."""

    poked = False

    def __init__(self, peers: KeyLoad | None) -> None:
        self.peers = peers
        self.claimed: list[str] = []

    def claim(self, key_id: str) -> KeyLoad | None:
        self.claimed.append(key_id)
        return self.peers

    def poke(self) -> None:
        pass

    def read_once(self) -> None:  # the peers' entries read afresh: the same as at the claim
        self.reads = getattr(self, "reads", 0) + 1


@pytest.fixture
def near_pool(pool):
    pool.get("k1").spend_estimate = 9.50   # 0.45 left before the point: near
    pool.estimator.observe("client", "m", 0.20)
    pool.bind("client", "k1")
    return pool


def test_one_sidecar_never_leaves_the_event_loop(near_pool) -> None:
    got = near_pool.acquire("client", blocking=False)        # no peer: memory decides, as before
    assert got is not None and got.key.id == "k1"


def test_near_the_point_with_peers_the_choice_leaves_the_loop_and_claims(near_pool) -> None:
    near_pool.peer_loads = {"": KeyLoad()}                    # a peer is at work
    near_pool.reservation_sharer = StubSharer(KeyLoad())
    assert near_pool.acquire("client", blocking=False) is None  # the claim needs the database
    got = near_pool.acquire("client")
    assert got.key.id == "k1" and not got.full and near_pool.reservation_sharer.claimed == ["k1"]
    near_pool.reserve("flow-1", "k1", "client", "m")          # the request takes the claim over
    assert near_pool.reservations.load("k1").in_flight == 1
    near_pool.bind("other", "k2")
    far = near_pool.acquire("other", blocking=False)          # far from its point: no database step
    assert far is not None and far.key.id == "k2"


def test_a_peer_claim_seen_at_the_claim_sends_the_request_elsewhere(near_pool) -> None:
    near_pool.peer_loads = {"": KeyLoad()}
    near_pool.reservation_sharer = StubSharer(KeyLoad(0.40, 2))  # a peer's requests fill the key
    got = near_pool.acquire("client")
    assert got.key.id == "k2" and not got.full
    assert near_pool.bindings["client"] == "k1"               # the conversation keeps its key
    assert near_pool.reservations.load("k1") == KeyLoad()     # the refused claim left nothing behind


def test_no_answer_from_the_database_falls_back_to_memory(near_pool) -> None:
    near_pool.peer_loads = {"": KeyLoad()}
    near_pool.reservation_sharer = StubSharer(None)
    got = near_pool.acquire("client")
    assert got.key.id == "k1" and not got.full


def test_a_rotation_onto_a_nearly_spent_successor_claims_it_too(tmp_path) -> None:
    from addon.pool.pool import Pool
    from addon.store.mongo import new_key_doc, utcnow
    from tests.memory_store import MemoryStore, make_writer

    store = MemoryStore()
    pool = Pool(store, make_writer(store, tmp_path / "journal.jsonl"), threshold=lambda: 9.95,
                default_budget=lambda: 10.0)
    for key_id, spend in (("k1", 9.96), ("k2", 9.50)):  # k1 past its point; its only successor near its own
        assert store.insert_key({**new_key_doc(key_id, f"sk-{key_id}-0123456789abcdef", 10.0, utcnow()),
                                 "spendEstimate": spend})
    pool.sync()
    pool.estimator.observe("client", "m", 0.20)
    pool.bind("client", "k1")
    pool.peer_loads = {"": KeyLoad()}
    pool.reservation_sharer = StubSharer(KeyLoad(0.40, 2))  # peers' requests already fill it
    got = pool.acquire("client")
    assert pool.reservation_sharer.claimed == ["k2"]
    assert got.key.id == "k2" and got.full                  # the request waits for room, not a budget error
    assert pool.reservations.load("k2") == KeyLoad()


# -- past the point: a key's last cents are drained one request at a time (issue 17) ----------------------
@pytest.mark.parametrize("spend, load, expected, why", [
    (9.96, KeyLoad(), True, "past the point, alone on the key, budget left: one more request"),
    (9.9985, KeyLoad(), True, "a cent and a half left is still used"),
    (9.9995, KeyLoad(), False, "within the drain margin of the budget: retired"),
    (10.02, KeyLoad(), False, "the budget is reached"),
    (9.96, KeyLoad(0.10, 1), False, "another request in flight: the upstream may charge it first"),
    (9.96, KeyLoad(0.10, 0), False, "a claim or reservation on it (any sidecar): busy"),
    (9.96, KeyLoad(recent=0.05), False, "a peer's fresh spend takes it to the budget"),
    (9.90, KeyLoad(), False, "below the point: admits() decides, not the drain"),
    (float("nan"), KeyLoad(), False, "a corrupt spend never drains"),
    (float("inf"), KeyLoad(), False, "an unbounded spend never drains"),
    (9.96, KeyLoad(float("nan"), 0), False, "a junk reservation figure is not 'alone'"),
])
def test_drains(spend: float, load: KeyLoad, expected: bool, why: str) -> None:
    assert rsv.drains(spend, BUDGET, POINT, load) is expected, why


@pytest.fixture
def drain_pool(pool):
    """k1 past its point (9.97 of 10), its last answer carried the upstream's own spend."""
    pool.record_usage("k1", 0.27, 10, 9.70, spend_is_after=False, client_id="client", model="m")
    assert pool.get("k1").spend_estimate == pytest.approx(9.97)
    pool.bind("client", "k1")
    return pool


def test_a_key_past_its_point_serves_its_client_one_request_at_a_time(drain_pool) -> None:
    got = drain_pool.acquire("client", blocking=False)
    assert got is not None and got.key.id == "k1" and got.rotated_from is None
    drain_pool.reserve("flow-1", "k1", "client", "m")          # adopts the drain claim: one in flight
    assert drain_pool.reservations.load("k1").in_flight == 1
    second = drain_pool.acquire("client", blocking=False)       # concurrent: another key, binding kept
    assert second is not None and second.key.id == "k2"
    assert drain_pool.bindings["client"] == "k1" and drain_pool.get("k1").status == "healthy"
    drain_pool.record_usage("k1", 0.02, 10, 9.97, spend_is_after=False, flow_id="flow-1")  # 9.99: 1 cent left
    assert drain_pool.acquire("client", blocking=False).key.id == "k1"


def test_a_drained_key_is_retired_once_the_budget_is_reached(drain_pool) -> None:
    drain_pool.record_usage("k1", 0.05, 10, 9.97, spend_is_after=False)      # 10.02: spent
    got = drain_pool.acquire("client")
    assert got.key.id == "k2" and got.rotated_from == "k1"
    assert drain_pool.get("k1").status == "exhausted"


def test_without_the_upstreams_figure_the_point_still_retires(pool) -> None:
    pool.get("k1").spend_estimate = 9.97                        # our meter alone (no header lately)
    pool.bind("client", "k1")
    got = pool.acquire("client")
    assert got.key.id == "k2" and pool.get("k1").status == "exhausted"


def test_a_stale_upstream_figure_does_not_drain(drain_pool) -> None:
    drain_pool.clock = lambda: drain_pool.get("k1").seen_spend_at + 11.0   # the header is 11 s old
    got = drain_pool.acquire("client")
    assert got.key.id == "k2" and drain_pool.get("k1").status == "exhausted"


def test_with_peers_a_drain_needs_their_fresh_loads(drain_pool) -> None:
    drain_pool.peer_loads = {"": KeyLoad()}
    drain_pool.reservation_sharer = StubSharer(KeyLoad(0.10, 1))   # a peer has a request on the key
    assert drain_pool.acquire("client", blocking=False) is None     # decided off the loop
    got = drain_pool.acquire("client")
    assert got.key.id == "k2" and drain_pool.reservations.load("k1") == KeyLoad()
    drain_pool.reservation_sharer = StubSharer(KeyLoad())           # the peer's request settled,
    drain_pool.peer_loads = {"": KeyLoad()}                         # and the sharer's next read shows it
    assert drain_pool.acquire("client").key.id == "k1"
    drain_pool.reservation_sharer = StubSharer(None)                # no answer from the database
    drain_pool.reservations = rsv.ReservationBook()
    assert drain_pool.acquire("client").key.id == "k2"              # not alone for sure: no drain


def test_the_spend_checker_leaves_a_draining_key_alone(drain_pool) -> None:
    assert drain_pool.draining("k1") and not drain_pool.draining("k2")
    drain_pool.record_usage("k1", 0.05, 10, 9.97, spend_is_after=False)
    assert not drain_pool.draining("k1")


def test_with_nothing_else_left_a_request_waits_for_the_draining_key(drain_pool) -> None:
    drain_pool.get("k2").spend_estimate = 10.2                  # the other key is spent, no backup left
    drain_pool.reserve("flow-1", "k1", "client", "m")
    got = drain_pool.acquire("client")
    assert got.key.id == "k1" and got.full                      # wait (the caller polls), not a 2nd request
    drain_pool.release("flow-1")
    got = drain_pool.acquire("client")
    assert got.key.id == "k1" and not got.full


def test_clients_of_spent_keys_share_the_last_draining_key_one_request_at_a_time(drain_pool) -> None:
    """The pool's end: every other key spent, no backup. Clients whose own keys are gone all land on the
    last key still short of its budget; it takes one of their requests at a time, the rest wait."""
    drain_pool.get("k2").spend_estimate = 10.2
    first = drain_pool.acquire("c2")
    assert first is not None and first.key.id == "k1" and not first.full and first.warning is None
    second = drain_pool.acquire("c3")                           # c2's request not sent yet: its claim holds
    assert second is not None and second.key.id == "k1" and second.full
    drain_pool.reserve("flow-c2", "k1", "c2", "m")
    drain_pool.record_usage("k1", 0.02, 10, 9.97, spend_is_after=False, flow_id="flow-c2")
    third = drain_pool.acquire("c3")
    assert third is not None and third.key.id == "k1" and not third.full


def test_the_last_resort_prefers_a_key_draining_alone(drain_pool) -> None:
    drain_pool.record_usage("k2", 0.01, 10, 9.97, spend_is_after=False)   # k2 at 9.98: draining too
    drain_pool.get("k2").spend_estimate = 9.98
    drain_pool.reserve("flow-1", "k1", "client", "m")                       # k1 busy, more budget left
    assert drain_pool.last_resort().id == "k2"
    drain_pool.release("flow-1")
    assert drain_pool.last_resort().id == "k1"                             # both alone: most budget left


def test_draining_off_retires_at_the_point(drain_pool) -> None:
    drain_pool.drain_past_point = lambda: False                # openhands_drain_past_point = false
    got = drain_pool.acquire("client")
    assert got.key.id == "k2" and drain_pool.get("k1").status == "exhausted"


@pytest.mark.parametrize("header, stored", [
    (1.0, None),       # 1.80: spend before this answer, as we metered it: the increment alone stores it
    (1.3, 1.4),        # the upstream counts more than we metered (spent elsewhere): the floor is written
])
def test_a_header_confirming_the_meter_costs_no_extra_write(pool, header, stored) -> None:
    pool.record_usage("k2", 0.1, 10, header, spend_is_after=False)
    op = pool.writer._queue[-1]
    assert op["kind"] == "usage" and op["key_spend_floor"] == (pytest.approx(stored) if stored else None)
    assert pool.get("k2").spend_estimate == pytest.approx(max(1.1, header + 0.1))


# -- what a budget error's figure may set (calibration never counts a request twice) -----------------------
def _raise_ops(pool) -> list[float]:
    return [op["spend"] for op in pool.writer._queue if op["kind"] == "raise_spend"]


@pytest.mark.parametrize("error_spend, peers, stored, memory, why", [
    (9.80, False, [9.80], 9.80, "no header lately, our meter is behind: the upstream's figure is stored"),
    (10.10, False, [], 9.97, "within one reservation of a header-confirmed figure: reservation noise, not spend"),
    (10.60, False, [10.60], 10.60, "far above it: the key was spent elsewhere"),
    (10.60, True, [], 10.60, "peers at work: kept in memory (their increments may not have landed yet)"),
])
def test_a_budget_errors_figure(drain_pool, error_spend, peers, stored, memory, why) -> None:
    if error_spend == 9.80:
        drain_pool.get("k1").seen_spend_at = 0.0         # no fresh header: nothing to trust but the error
        drain_pool.get("k1").spend_estimate = 9.50
    if peers:
        drain_pool.peer_loads = {"": KeyLoad()}
    drain_pool.retire("k1", "exhausted", "budget", spend=error_spend)
    assert _raise_ops(drain_pool) == stored, why
    assert drain_pool.get("k1").spend_estimate == pytest.approx(memory), why


def test_a_key_the_upstream_shows_spent_is_retired_even_with_nowhere_to_go(drain_pool) -> None:
    drain_pool.store.raise_spend("k2", 10.2)                          # the other key is spent too, no backup
    drain_pool.get("k2").spend_estimate = 10.2
    drain_pool.record_usage("k1", 0.05, 10, 9.97, spend_is_after=False)   # k1 at 10.02 by the upstream's figure
    got = drain_pool.acquire("client")
    assert got.key is None                                            # the pool's "no key" answer, no budget error
    assert drain_pool.get("k1").status == "exhausted"


def test_a_key_drained_to_its_budget_is_retired_by_the_sync_not_at_its_next_request(drain_pool) -> None:
    drain_pool.reserve("flow-1", "k1", "client", "m")
    drain_pool.record_usage("k1", 0.05, 10, 9.97, spend_is_after=False)  # 10.02, but a request is in flight
    assert drain_pool.retire_spent() == [] and drain_pool.get("k1").status == "healthy"
    drain_pool.release("flow-1")
    assert drain_pool.retire_spent() == ["k1"] and drain_pool.get("k1").status == "exhausted"
    assert drain_pool.retire_spent() == [] and drain_pool.get("k2").status == "healthy"


@pytest.mark.parametrize("amount", [float("nan"), float("inf"), -1.0, None])
def test_a_reservation_of_no_real_amount_holds_the_request_and_no_dollars(amount) -> None:
    book = rsv.ReservationBook(ttl_s=60)
    book.reserve("f1", "k1", amount, now=0)  # type: ignore[arg-type]
    assert book.load("k1") == KeyLoad(0.0, 1)
    assert book.release("f1") == "k1" and book.load("k1") == KeyLoad()
