"""kill -9 under load (issue 14): a real mitmdump is SIGKILLed while clients are being answered, with
MongoDB up and in the middle of a MongoDB outage; the restarted sidecar replays its write-ahead
journal and every answered dollar is in `spendEstimate` — no more than the upstream charged."""
from __future__ import annotations

import threading
import time

import pymongo
import pytest
import requests

from tests.harness import MongoServer

pytestmark = pytest.mark.e2e

KEYS = {"k1": "sk-crash-key-one-0123456789", "k2": "sk-crash-key-two-0123456789"}
CHAT = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}


def stored(uri: str, db: str) -> tuple[int, float]:
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000)
    try:
        docs = list(client[db].openhands_keys.find())
        return sum(d.get("requestsCount", 0) for d in docs), sum(d.get("spendEstimate", 0.0) for d in docs)
    finally:
        client.close()


def eventually(check, timeout: float = 30.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(every)


@pytest.fixture
def own_mongo(tmp_path):
    server = MongoServer(tmp_path / "crash-db").start()
    yield server
    server.stop()


@pytest.mark.parametrize("outage", [False, True], ids=["mongodb-up", "mongodb-down"])
def test_kill_9_under_load_loses_no_answered_dollar(own_mongo, upstream, sidecar_factory, db_name, tmp_path, outage):
    for k in KEYS.values():
        upstream.add_key(k, budget=1000.0)
    env = {"OPENHANDS_DATA_DIR": str(tmp_path / "data")}
    sc = sidecar_factory(mongo_uri=own_mongo.uri, env=env)
    for key_id, api_key in KEYS.items():
        sc.add_key(key_id, api_key, budget=1000.0)

    answered: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(i: int) -> None:
        s = requests.Session()
        while not stop.is_set():
            try:
                r = s.post(sc.url + "/chat/completions", json=CHAT, timeout=10,
                           headers={"x-litellm-session-id": f"crash-{i}"})
            except requests.RequestException:
                return  # the sidecar is gone
            if r.status_code == 200:
                with lock:
                    answered.append(float(r.headers["x-litellm-response-cost"]))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    assert eventually(lambda: len(answered) >= 20)
    if outage:
        own_mongo.stop()
        n = len(answered)
        assert eventually(lambda: len(answered) >= n + 40)  # answered from memory, queued, journaled
    sc.kill()  # SIGKILL in the middle of the load
    stop.set()
    for t in threads:
        t.join(timeout=15)
    answered_usd = sum(answered)
    charged_usd = sum(upstream.spend(k) for k in KEYS.values())
    if outage:
        own_mongo.restart()

    sc2 = sidecar_factory(mongo_uri=own_mongo.uri, env=env)  # same data directory: replays the journal
    got = eventually(lambda: stored(own_mongo.uri, db_name)[1] >= answered_usd - 1e-9)
    requests_n, stored_usd = stored(own_mongo.uri, db_name)
    assert got, (answered_usd, stored_usd)
    assert stored_usd >= answered_usd - 1e-9  # no answered dollar lost
    assert stored_usd <= charged_usd + 1e-9  # and nothing counted twice (never more than the upstream charged)
    assert len(answered) <= requests_n
    listed = sc2.keys()
    assert sum(k["spendEstimate"] for k in listed.values()) == pytest.approx(stored_usd, abs=1e-5)
    if outage:
        assert "replayed" in sc2.out.text()
    print(f"\nCRASH ({'MongoDB down' if outage else 'MongoDB up'}): answered ${answered_usd:.4f}, "
          f"stored after replay ${stored_usd:.4f}, upstream charged ${charged_usd:.4f}")
