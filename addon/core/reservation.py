"""In-flight reservation (DESIGN §7, issue 17): pure rules and bookkeeping, no I/O.

A request's cost is known only when it is metered, so a key near its rotation point could be handed
more concurrent requests than it can pay for; the upstream then refuses the next one with a budget
error and the sidecar must retry (a retried stream reaches the client whole). Each request sent on a
key therefore reserves an estimate of its cost until it is metered or fails, and a key whose effective
spend plus reservations (its own sidecar's and its peers') reaches the rotation point takes no new
request for now: it is *full*, not retired, and serves again once its reservations settle.

Under LiteLLM's own budget reservation (≥ 1.86, on by default in 1.110) a key with less than about one
request's maximum cost left serves one request at a time and refuses concurrent ones as "busy"; so a key
also takes a new request only while `spend + in_flight × max_request_cost` stays below its budget (with
nothing in flight it always may, until its rotation point), which sends a key's last requests one at a
time instead of collecting refusals.

Past its rotation point a key's last cents are *drained*: while the upstream's own figure shows it below
its budget, it takes one request at a time — nothing else in flight or reserved on it, on any sidecar —
until that figure reaches the budget (`drains`). The upstream admits a request while the key's spend is
below its budget, so a key used alone is never refused; concurrent requests go to other keys meanwhile.

`x-litellm-key-spend` is the spend before this request on LiteLLM ≤ 1.10x and on streams, and the spend
after it on 1.110 JSON answers (`reference/litellm-errors.md` §6): `header_spend_floor` says which.
"""
from __future__ import annotations

import math
import re
from operator import itemgetter
from collections import OrderedDict, deque
from dataclasses import dataclass
from collections.abc import Mapping as AbcMapping
from typing import Any, Callable, Iterable, Mapping, cast

__all__ = ["DEFAULT_ESTIMATE", "MAX_REQUEST_COST", "RESERVATION_TTL_S", "CLAIM_TTL_S", "NEAR_REQUESTS", "KeyLoad",
           "DRAIN_MARGIN", "CostEstimator", "ReservationBook", "admits", "drains", "in_drain_zone", "near_point",
           "header_spend_floor", "spend_is_after", "parse_version", "MAX_PARTS", "admits_totals"]

DEFAULT_ESTIMATE = 0.25     # first request of a client and model: about one Sonnet agent turn at most
MAX_REQUEST_COST = 0.25     # what LiteLLM's reservation holds for one request without max_tokens (§6)
RESERVATION_TTL_S = 900.0   # a reservation never outlives this, even if its flow's end was never seen
CLAIM_TTL_S = 10.0          # a confirmed claim whose request never went out is dropped after this
NEAR_REQUESTS = 8           # within this many request estimates of its point a key is "near" (see near_point)
SPEND_EPSILON = 1e-6
DRAIN_MARGIN = 0.001        # a key past its point drains only while more than this is left of its budget
_HISTORY = 8                # recent costs kept per client and model
_MAX_CLIENTS = 4096         # bounded memory: least recently used estimates are forgotten


@dataclass(frozen=True)
class KeyLoad:
    """What is riding on a key right now: reserved dollars and requests in flight (all sidecars),
    plus spend peers metered so recently that our copy of the key may not show it yet.

    `parts` splits `recent` by op: (writer, last usage-op sequence number, dollars) per landed write and per
    cost not written yet. A reader whose copy of the key holds that writer's ops up to that number (the key
    document's landed ranges) counts only the rest (`unsynced`): exact whenever the entry was published,
    landed or not — no cost is counted twice. `legacy` is fresh spend a peer published without parts (an
    older version): it counts as load only, as that version meant it."""

    reserved: float = 0.0
    in_flight: int = 0
    recent: float = 0.0
    parts: tuple[tuple[str, int, float], ...] = ()
    legacy: float = 0.0

    def __add__(self, other: "KeyLoad") -> "KeyLoad":
        return KeyLoad(self.reserved + other.reserved, self.in_flight + other.in_flight, self.recent + other.recent,
                       self.parts + other.parts if other.parts else self.parts, self.legacy + other.legacy)

    def without(self, amount: float, requests: int = 1) -> "KeyLoad":
        """This load minus one request's own reservation (never below zero)."""
        return KeyLoad(max(self.reserved - _finite(amount), 0.0), max(self.in_flight - requests, 0), self.recent,
                       self.parts, self.legacy)

    def as_load(self) -> "KeyLoad":
        """A peer's load as admission counts it: reservations and requests, and an older peer's fresh spend as
        `recent` (as that version meant it); the rest of its fresh spend is the key's (`unsynced`)."""
        if not (self.recent or self.parts or self.legacy):
            return self
        return KeyLoad(self.reserved, self.in_flight, self.legacy)

    def unsynced(self, marks: Mapping[str, int]) -> float:
        """`recent` less the parts our copy of the key holds (`marks`: writer -> last sequence number in it,
        see store.mongo.writer_marks)."""
        recent = _finite(self.recent)
        if not self.parts or not marks:
            return recent
        seen = sum(_finite(a) for w, s, a in self.parts if s <= marks.get(w, -1))
        return max(recent - seen, 0.0)


def _finite(x: float | None) -> float:
    return float(x) if x is not None and math.isfinite(x) and x >= 0 else 0.0


def admits(spend: float, budget: float, point: float, load: KeyLoad,
           max_request_cost: float = MAX_REQUEST_COST) -> bool:
    """May a key with this effective spend and load take one more request now?

    Its own request's estimate is not counted: a key below its point with nothing in flight always
    takes the request (that is how its last cents get used; the point's margin absorbs it).
    """
    return admits_totals(spend, budget, point, load.reserved, load.in_flight, load.recent, max_request_cost)


def admits_totals(spend: float, budget: float, point: float, reserved: float, in_flight: int, recent: float,
                  max_request_cost: float = MAX_REQUEST_COST) -> bool:
    """`admits` on the load's figures (the request path's form: no KeyLoad to build)."""
    # (`x == x and 0 <= x < inf` is _finite's test, inlined: this runs for every request)
    spend = spend if spend == spend and 0.0 <= spend < math.inf else 0.0
    reserved = reserved if reserved == reserved and 0.0 <= reserved < math.inf else 0.0
    recent = recent if recent == recent and 0.0 <= recent < math.inf else 0.0
    if spend + reserved + recent >= point - SPEND_EPSILON:
        return False
    if in_flight <= 0:
        return True
    return spend + recent + in_flight * max(_finite(max_request_cost), 0.0) < budget - SPEND_EPSILON


def in_drain_zone(spend: float, budget: float, point: float, recent: float = 0.0) -> bool:
    """Past its rotation point, yet (with peers' unsynced spend) still short of its budget."""
    if not (math.isfinite(spend) and math.isfinite(budget) and math.isfinite(point)):
        return False
    return spend >= point - SPEND_EPSILON and spend + _finite(recent) < budget - DRAIN_MARGIN


def drains(spend: float, budget: float, point: float, load: KeyLoad) -> bool:
    """May a key past its rotation point take one more request now? Only alone: with nothing in
    flight or reserved on it (every sidecar's), the upstream sees exactly `spend` when the request
    arrives, and admits it while that is below the budget — the request's own cost never counts."""
    if load.in_flight > 0 or not (load.reserved <= SPEND_EPSILON):  # NaN reserved: not alone
        return False
    return in_drain_zone(spend, budget, point, load.recent)


def near_point(spend: float, point: float, held: float, estimate: float, requests: int = NEAR_REQUESTS) -> bool:
    """Is a key close enough to its rotation point that peers' unpublished requests could push it over?

    Far from the point a request is admitted from memory (peers' reservations, published in the
    background, may lag by a few tens of milliseconds: harmless while the key has room for several
    requests). Within `requests` estimates of the point a request is admitted only after its own
    reservation is visible to peers and their loads have been read again (`Pool.acquire`, off the loop).
    `held` = reserved dollars plus peers' fresh spend on the key (`KeyLoad.reserved + recent`, all sidecars).
    """
    if not (estimate > 0 and estimate < math.inf):  # no usable estimate (NaN fails both): the default
        estimate = DEFAULT_ESTIMATE
    if not (held >= 0 and held < math.inf):
        held = 0.0
    return spend + held >= point - estimate * requests


class CostEstimator:
    """A running per-(client, model) estimate of one request's cost from recent metered costs.

    The estimate is the largest of the last few costs (a reservation too small lets a key overshoot;
    one too large only sends a request to another key a little early); then the model's, then the
    default. Not thread-safe: the pool calls it under its lock.
    """

    def __init__(self, default: float = DEFAULT_ESTIMATE, history: int = _HISTORY, max_clients: int = _MAX_CLIENTS):
        self.default = default
        self.history = history
        self.max_clients = max_clients
        # The per-(client, model) window, read per request (`estimate`), is [recent costs, the largest of them],
        # the largest kept up to date on observe (one look-up). The others are read only off the common path (a
        # new client or model, a claim near a key's point): plain windows, their largest taken when read.
        self._by_client: OrderedDict[tuple[str, str], list[Any]] = OrderedDict()
        self._by_model: dict[str, deque[float]] = {}
        self._any_model: OrderedDict[str, deque[float]] = OrderedDict()  # per client, whatever the model
        self._all: deque[float] = deque(maxlen=4 * history)

    def observe(self, client: str, model: str | None, cost: float) -> None:
        if not 0 <= cost < math.inf:  # (NaN, negative and infinite costs are no estimate)
            return
        m = model or ""
        key = (client, m)
        by_client = self._by_client
        w = by_client.get(key)
        if w is None:
            by_client[key] = [deque((cost,), maxlen=self.history), cost]
            if len(by_client) > self.max_clients:
                by_client.popitem(last=False)
        else:
            by_client.move_to_end(key)
            window = w[0]
            if cost >= w[1]:
                window.append(cost)
                w[1] = cost
            elif len(window) == window.maxlen and window[0] >= w[1]:  # the largest leaves: scan the rest
                window.append(cost)
                w[1] = max(window)
            else:
                window.append(cost)
        d = self._by_model.get(m)
        if d is None:
            d = self._by_model[m] = deque(maxlen=4 * self.history)
            if len(self._by_model) > self.max_clients:
                del self._by_model[next(iter(self._by_model))]
        d.append(cost)
        any_model = self._any_model
        d = any_model.get(client)
        if d is None:
            d = any_model[client] = deque(maxlen=self.history)
            if len(any_model) > self.max_clients:
                any_model.popitem(last=False)
        else:
            any_model.move_to_end(client)
        d.append(cost)
        self._all.append(cost)

    def estimate(self, client: str, model: str | None) -> float:
        w = self._by_client.get((client, model or ""))
        if w is not None:
            return w[1]  # type: ignore[no-any-return]
        d = self._by_model.get(model or "")
        return max(d) if d else self.default

    def estimate_client(self, client: str) -> float:
        """Before the model is known (key choice): the largest of the client's last few costs whatever
        the model, else of everyone's, else the default."""
        d = self._any_model.get(client) or self._all
        return max(d) if d else self.default


# A flow's reservation: (key id, amount, when) — a tuple, built per request without a Python-level __init__.
_Entry = tuple[str, float, float]


class ReservationBook:
    """This sidecar's open reservations, one per flow: reserve moves a flow's reservation (a retry on
    another key), release drops it; entries older than the TTL are swept so none can leak for good.
    Not thread-safe: the pool calls it under its lock."""

    def __init__(self, ttl_s: float = RESERVATION_TTL_S) -> None:
        self.ttl_s = ttl_s
        # flow id -> its reservation; read by the pool on the request path (`flow_id in book.flows`: no call)
        self.flows: dict[str, _Entry] = {}
        # key id -> [reserved dollars, requests]; the request count only ever has ints added (an int)
        self._keys: dict[str, list[float]] = {}
        # key id -> [at, cost, landed, op, seq] metered lately: `landed` is when its write was in the database
        # (the writer stamps the usage op `op` with `landed_at`), inf until then; `seq` its op's sequence number
        self._recent: dict[str, deque[list[Any]]] = {}
        self._last_sweep = 0.0
        # Confirmed claims (a key near its point, admitted after peers saw the claim): (client, key) ->
        # claim ids, oldest first; the request's `reserve` takes its claim over (`adopt`).
        self._claims: dict[tuple[str, str], deque[str]] = {}
        self._claim_seq = 0

    def __len__(self) -> int:
        return len(self.flows)

    def reserve(self, flow_id: str, key_id: str, amount: float, now: float) -> None:
        if flow_id in self.flows:
            self.release(flow_id)
        amount = _finite(amount)
        self.flows[flow_id] = (key_id, amount, now)
        t = self._keys.get(key_id)
        if t is None:  # (setdefault would build the list on every call)
            self._keys[key_id] = [amount, 1]
        else:
            t[0] += amount
            t[1] += 1
        if now - self._last_sweep > 30.0:
            self.sweep(now)

    def release(self, flow_id: str) -> str | None:
        """Drop a flow's reservation; returns the key it was on (None if it held none)."""
        e = self.flows.pop(flow_id, None)
        if e is None:
            return None
        key_id = e[0]
        t = self._keys.get(key_id)
        if t is not None:
            t[0] -= e[1]
            t[1] -= 1
            if t[1] <= 0:
                del self._keys[key_id]
        return key_id

    def claim(self, client_id: str, key_id: str, amount: float, now: float) -> str:
        """Hold a reservation on `key_id` for a request of `client_id` not sent yet (its flow's
        `adopt` takes it over; one never adopted is dropped after CLAIM_TTL_S). Returns the claim id."""
        self._claim_seq += 1
        claim_id = f"claim:{self._claim_seq}"
        self.reserve(claim_id, key_id, amount, now)
        self._claims.setdefault((client_id, key_id), deque()).append(claim_id)
        return claim_id

    def unclaim(self, claim_id: str, client_id: str, key_id: str) -> None:
        """The claim was refused (the key has no room after all): it ends."""
        self.release(claim_id)
        q = self._claims.get((client_id, key_id))
        if q is not None:
            try:
                q.remove(claim_id)
            except ValueError:
                pass
            if not q:
                del self._claims[(client_id, key_id)]

    def adopt(self, flow_id: str, client_id: str, key_id: str, amount: float, now: float) -> bool:
        """`reserve` for a flow whose key choice left a claim on `key_id`: the claim becomes the
        flow's reservation (the larger amount of the two) without the key's load ever dropping."""
        if not self._claims:  # (the usual case: no claim waits)
            return False
        q = self._claims.get((client_id, key_id))
        claim = None
        while q and claim is None:
            c = q.popleft()
            if c in self.flows:
                claim = self.flows[c]
                self.release(c)
        if q is not None and not q:
            del self._claims[(client_id, key_id)]
        if claim is None:
            return False
        self.reserve(flow_id, key_id, max(_finite(amount), claim[1]), now)
        return True

    def sweep_claims(self, now: float, ttl_s: float = CLAIM_TTL_S) -> None:
        for ck in list(self._claims):
            q = self._claims[ck]
            while q and (q[0] not in self.flows or now - self.flows[q[0]][2] > ttl_s):
                self.release(q.popleft())
            if not q:
                del self._claims[ck]

    def holds(self, flow_id: str) -> str | None:
        e = self.flows.get(flow_id)
        return e[0] if e is not None else None

    def sweep(self, now: float) -> int:
        self._last_sweep = now
        stale = [f for f, e in self.flows.items() if now - e[2] > self.ttl_s]
        for f in stale:
            self.release(f)
        return len(stale)

    def settled(self, key_id: str, cost: float, now: float, window_s: float, op: dict[str, Any] | None = None,
                seq: int = -1) -> None:
        """Remember a metered cost until it is written and then for `window_s` more (a peer's sync reads
        it by then): until then peers count it, since their copy of the key may not show it yet. `op` is
        its usage op (the writer stamps it `landed_at` once the database has it), `seq` its sequence number."""
        if 0 < cost < math.inf:  # (NaN fails it too)
            dq = self._recent.get(key_id)
            if dq is None:  # (setdefault would build a deque on every call)
                dq = self._recent[key_id] = deque(maxlen=256)
            dq.append([now, cost, math.inf, op, seq])

    def _trim(self, key_id: str, now: float, window_s: float, unwritten: float) -> None:
        dq = self._recent.get(key_id)
        if dq is None:
            return
        inf = math.inf
        for e in dq:
            if e[2] == inf:
                at = e[3].get("landed_at") if e[3] is not None else None
                if isinstance(at, float):
                    e[2] = min(at, now)
                elif unwritten <= 1e-9:  # every cost metered so far is in the database now
                    e[2] = now
        while dq and now - dq[0][2] > window_s:
            dq.popleft()
        if not dq:
            del self._recent[key_id]

    def reserved(self, key_id: str) -> float:
        """Reserved dollars on the key (the hot path's cheap form of `load`)."""
        t = self._keys.get(key_id)
        return max(t[0], 0.0) if t else 0.0

    def load(self, key_id: str) -> KeyLoad:
        t = self._keys.get(key_id)
        return KeyLoad(max(t[0], 0.0), cast(int, t[1])) if t else KeyLoad()

    def totals(self, key_id: str) -> tuple[float, int]:
        """(reserved dollars, requests) on the key: `load` without building a KeyLoad (the request path)."""
        t = self._keys.get(key_id)
        if t is None:
            return 0.0, 0
        return (t[0] if t[0] > 0.0 else 0.0), t[1]  # type: ignore[return-value]  # (the count only has ints added)

    def loads(self, now: float, window_s: float, unwritten: Callable[[str], float] = lambda _k: 0.0
              ) -> dict[str, KeyLoad]:
        """Every key with something on it: reservations, requests and recently metered cost (to publish).
        `unwritten(key)` is the metered cost still waiting for the database (the write-behind queue)."""
        if self._claims:
            self.sweep_claims(now)
        for key_id in list(self._recent):
            self._trim(key_id, now, window_s, unwritten(key_id))
        out = {k: KeyLoad(max(t[0], 0.0), cast(int, t[1])) for k, t in self._keys.items()}
        for key_id, dq in self._recent.items():
            out[key_id] = out.get(key_id, KeyLoad()) + KeyLoad(recent=sum(map(_COST, dq)), parts=_parts(dq))
        return out


MAX_PARTS = 32  # parts of a key's fresh spend published per sidecar (the oldest merge: counted a little longer)
_COST = itemgetter(1)  # a recent entry's dollars


def _parts(dq: Iterable[list[Any]]) -> tuple[tuple[str, int, float], ...]:
    """("", last sequence number, dollars): one part per landed write (its costs share a landing time) and
    one per cost not written yet, oldest first, at most MAX_PARTS — merged parts are counted until the
    reader's copy holds the later one (never too little). A cost without a sequence number is in no part
    (always counted). The writer is "": a reader knows whose entry it read.

    Every publication reads every cost of the window (a hot key's deque is full): one plain loop, and the
    merge of a long tail of costs not written yet done at once (`_merged_tail`)."""
    parts: list[list[Any]] = []  # [landed at, last seq, dollars]
    inf = math.inf
    landed_at = None  # the last part's landing time while it is landed (a later cost landed then joins it)
    for _at, cost, at, _op, seq in dq:
        if seq < 0:
            continue
        if at == landed_at:  # (never for a cost not written yet, nor NaN: None and inf compare unequal)
            last = parts[-1]
            if seq > last[1]:
                last[1] = seq
            last[2] += cost
        else:
            parts.append([at, seq, cost])
            landed_at = None if at == inf else at
    if len(parts) > MAX_PARTS:
        parts = _merged_tail(parts)
    while len(parts) > MAX_PARTS:
        # Landed writes come first (they land in order). Two costs not written yet merge first — the oldest
        # pair, most likely in one write: a landed write merged into a later part would be counted again
        # by a reader whose copy already holds it.
        i = next((j for j in range(len(parts) - 1) if parts[j][0] == math.inf), 0)
        (_, s1, a), (at, s2, b) = parts[i], parts[i + 1]
        parts[i:i + 2] = [[at, max(s1, s2), a + b]]
    return tuple(("", int(s), float(a)) for _, s, a in parts)


def _merged_tail(parts: list[list[Any]]) -> list[list[Any]]:
    """What `_parts`'s pairwise merge makes of parts that are landed writes followed by costs not written
    yet (the usual layout): the oldest costs not written yet become one part, merged in order, until at
    most MAX_PARTS are left or one such cost remains; any other layout is returned as it is, for the
    pairwise merge to do."""
    inf = math.inf
    first = next((j for j, p in enumerate(parts) if p[0] == inf), len(parts))  # the first cost not written yet
    n = len(parts)
    if n - first < 2 or any(p[0] != inf for p in parts[first:]):
        return parts
    k = min(n - MAX_PARTS, n - first - 1)  # pairwise merges the unwritten tail takes (each leaves one part fewer)
    group = parts[first:first + k + 1]
    dollars = group[0][2]
    for p in group[1:]:  # (in order, as the pairwise merge adds them)
        dollars += p[2]
    merged = [inf, max(p[1] for p in group), dollars]
    return [*parts[:first], merged, *parts[first + k + 1:]]


# -- which spend an x-litellm-key-spend header proves -------------------------------------------------
_VERSION = re.compile(r"\s*v?(\d{1,4})\.(\d{1,4})(?:\.(\d{1,6}))?")


def parse_version(value: str | None) -> tuple[int, int, int] | None:
    """`1.110.2` -> (1, 110, 2); junk -> None. (An upstream sends one version on every answer: each
    string is read once, `_VERSIONS` bounded.)"""
    if not value:
        return None
    if type(value) is str:
        try:
            return _VERSIONS[value]
        except KeyError:
            pass
    m = _VERSION.match(str(value))
    parsed = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None
    if type(value) is str and len(_VERSIONS) < _VERSIONS_CAP:
        _VERSIONS[value] = parsed
    return parsed


_VERSIONS: dict[str, tuple[int, int, int] | None] = {}
_VERSIONS_CAP = 256


def spend_is_after(headers: Mapping[str, str] | Iterable[str], streamed: bool, version: str | None) -> bool | None:
    """Does this answer's `x-litellm-key-spend` already include its own cost?

    Streams: never (the cost is known only after the last byte). JSON: on LiteLLM ≥ 1.110, yes; on an
    older `x-litellm-version`, no. Without a version header, the per-part cost headers
    (`x-litellm-response-cost-input`, …) are a 1.110 signal; with neither, None (unknown).
    """
    if streamed:
        return False
    v = parse_version(version)
    if v is not None:
        return v >= (1, 110, 0)
    if not headers:  # no header names at all (the request path's usual call): unknown, without a walk
        return None
    # collections.abc's Mapping: typing's runs Python-level code in isinstance (~1.5 us per answer)
    names = headers.keys() if isinstance(headers, (dict, AbcMapping)) else headers
    if any(str(n).lower().startswith("x-litellm-response-cost-") for n in names):
        return True
    return None


def header_spend_floor(header_spend: float | None, cost: float, after: bool | None) -> float | None:
    """The key spend (after this request) an `x-litellm-key-spend` header proves, never counting the
    request twice: `after` -> the header itself; before -> header + cost; unknown -> the header alone
    (a lower bound on both versions; the metered increment still adds the cost)."""
    if header_spend is None or not math.isfinite(header_spend) or header_spend < 0:
        return None
    if after is False:
        return header_spend + _finite(cost)
    return header_spend
