"""MongoDB outages mid-traffic (issue 6 §1): real mitmdump, a MongoDB-protocol server this test stops,
restarts and black-holes, and the fake upstream. The sidecar serves from memory, spend waits in the
write-behind queue, a stop during the outage journals it, the next start replays it, nothing twice."""
from __future__ import annotations

import select
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pymongo
import pytest
import requests

from addon.store.journal import orphans
from addon.store.mongo import PoolStore
from addon.store.writer import StoreWriter
from tests.harness import MongoServer

pytestmark = pytest.mark.e2e

KEYS = {"k1": "sk-outage-key-one-0123456789", "k2": "sk-outage-key-two-0123456789"}
CHAT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}


def send(sc, n: int, tag: str, workers: int = 4) -> list[tuple[float, float]]:
    """n chat requests over `workers` threads; returns (latency, cost charged) per request, all 200."""
    def one(i: int) -> tuple[float, float]:
        t0 = time.monotonic()
        r = requests.post(sc.url + "/chat/completions", json=CHAT,
                          headers={"x-litellm-session-id": f"{tag}-{i % 6}"}, timeout=15)
        assert r.status_code == 200, r.text
        return time.monotonic() - t0, float(r.headers["x-litellm-response-cost"])
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, range(n)))


def db_totals(uri: str, db: str) -> tuple[int, float]:
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=3000)
    try:
        docs = list(client[db].openhands_keys.find())
        return sum(d.get("requestsCount", 0) for d in docs), sum(d.get("spendEstimate", 0.0) for d in docs)
    finally:
        client.close()


def wait_db_totals(uri: str, db: str, requests_n: int, timeout: float = 20.0) -> tuple[int, float]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = db_totals(uri, db)
        except pymongo.errors.PyMongoError:
            got = (-1, 0.0)
        if got[0] >= requests_n or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.fixture
def own_mongo(tmp_path):
    server = MongoServer(tmp_path / "outage-db").start()
    yield server
    server.stop()


def test_outage_serves_from_memory_queues_spend_journals_on_stop_and_replays_once(
        own_mongo, upstream, sidecar_factory, db_name, tmp_path):
    for k in KEYS.values():
        upstream.add_key(k)
    data_dir = tmp_path / "shared-data"
    env = {"OPENHANDS_DATA_DIR": str(data_dir)}
    sc = sidecar_factory(mongo_uri=own_mongo.uri, env=env)
    for key_id, api_key in KEYS.items():
        sc.add_key(key_id, api_key)
    charged = [c for _, c in send(sc, 10, "warm")]
    assert wait_db_totals(own_mongo.uri, db_name, 10)[0] == 10

    # -- outage 1: the server is stopped (connection refused) --------------------------------------
    own_mongo.stop()
    outage = send(sc, 40, "down")
    charged += [c for _, c in outage]
    latencies = sorted(lat for lat, _ in outage)
    assert latencies[len(latencies) // 2] < 0.5 and latencies[-1] < 2.0, latencies  # never waits on MongoDB
    sc.out.wait_for(r"MongoDB write failed .* serving from memory", timeout=15)
    keys = sc.keys()  # the admin listing is served from memory too
    assert sum(k["requestsCount"] for k in keys.values()) == 50
    assert sum(k["spendEstimate"] for k in keys.values()) == pytest.approx(sum(charged), abs=1e-6)

    own_mongo.restart()
    got = wait_db_totals(own_mongo.uri, db_name, 50)
    assert got[0] == 50 and got[1] == pytest.approx(sum(charged), abs=1e-6)  # the queue was written, once
    sc.out.wait_for(r"MongoDB is back after", timeout=15)

    # -- outage 2: the sidecar stops while the database is still down -------------------------------
    own_mongo.stop()
    charged += [c for _, c in send(sc, 15, "down2")]
    assert sc.stop() == 0
    assert "saved to" in sc.out.text() and "Traceback" not in sc.out.text()
    journal = data_dir / f"journal-{db_name}"
    (orphan,) = list(orphans(journal))  # the stopped sidecar's journal, unacknowledged ops only
    pending = [op for _, op in orphan.pending_ops()]
    orphan.release()
    usage_ops = [op for op in pending if op["kind"] == "usage"]
    assert len(usage_ops) == 15 and len({op["op_id"] for op in usage_ops}) == 15
    saved = tmp_path / "journal-copy"
    shutil.copytree(journal, saved)

    own_mongo.restart()
    sc2 = sidecar_factory(mongo_uri=own_mongo.uri, env=env)
    sc2.out.wait_for(r"replayed \d+ journaled update", timeout=5)
    assert list(orphans(journal)) == []  # replayed and removed
    got = db_totals(own_mongo.uri, db_name)
    assert got[0] == 65 and got[1] == pytest.approx(sum(charged), abs=1e-6)
    assert sum(k["requestsCount"] for k in sc2.keys().values()) == 65

    # -- replaying the same journal again changes nothing (op ids) ---------------------------------
    replay_root = tmp_path / "replay-again" / f"journal-{db_name}"
    shutil.copytree(saved, replay_root)
    store = PoolStore(own_mongo.uri, db_name)
    try:
        writer = StoreWriter(store, replay_root.with_suffix(".jsonl"))
        assert writer.replay_journal() == len(pending)
        writer.stop()
    finally:
        store.close()
    got = db_totals(own_mongo.uri, db_name)
    assert got[0] == 65 and got[1] == pytest.approx(sum(charged), abs=1e-6)
    lines = pending
    print(f"\nOUTAGE: served {len(outage)} requests with the DB stopped "
          f"(median {latencies[len(latencies)//2]*1000:.0f} ms, "
          f"max {latencies[-1]*1000:.0f} ms); 40 queued usage updates written after restart; "
          f"{len(lines)} journaled ops replayed once")


class BlackHole:
    """A TCP forwarder in front of MongoDB that can stop answering (a hung or very slow database)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.holes = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            self.conns += [c, u]
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self.stopped:
                ready, _, _ = select.select([a, b], [], [], 0.1)
                for s in ready:
                    if self.holes.is_set():
                        continue  # swallow nothing, answer nothing: the request just hangs
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
                if self.holes.is_set():
                    time.sleep(0.05)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def close(self) -> None:
        self.stopped = True
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def test_hung_database_never_slows_the_request_path(own_mongo, upstream, sidecar_factory, db_name):
    hole = BlackHole(own_mongo.port)
    try:
        for k in KEYS.values():
            upstream.add_key(k)
        sc = sidecar_factory(mongo_uri=f"mongodb://127.0.0.1:{hole.port}/?directConnection=true")
        for key_id, api_key in KEYS.items():
            sc.add_key(key_id, api_key)
        charged = [c for _, c in send(sc, 6, "warm")]
        hole.holes.set()  # every MongoDB operation now hangs
        hung = send(sc, 30, "hung")
        charged += [c for _, c in hung]
        latencies = sorted(lat for lat, _ in hung)
        assert latencies[-1] < 2.0, latencies
        r = sc.admin("POST", "/admin/openhands/keys", {"id": "k3", "apiKey": "sk-outage-key-three-01234567"})
        assert r.status_code == 503 and "database" in r.json()["error"]["message"]  # said so, not a 500
        assert sum(k["requestsCount"] for k in sc.keys().values()) == 36
        hole.holes.clear()
        got = wait_db_totals(own_mongo.uri, db_name, 36, timeout=30)
        assert got[0] == 36 and got[1] == pytest.approx(sum(charged), abs=1e-6)
        assert "Traceback" not in sc.out.text()
    finally:
        hole.close()
