"""End to end metering (issue: metering): real mitmdump, SecantusDB, fake upstream in all three formats."""
from __future__ import annotations

import json
import time

import pytest
import requests

from tests.harness import eventually

pytestmark = pytest.mark.e2e

KEY_A = "sk-meter-aaaaaaaaaaaaaaaa"
KEY_B = "sk-meter-bbbbbbbbbbbbbbbb"
CLAUDE = "claude-sonnet-4-5"
GPT = "gpt-5-mini-2025-08-07"

REQUESTS = [
    # (path, body, streamed)
    ("/chat/completions", {"model": CLAUDE, "messages": [{"role": "user", "content": "hi"}]}, False),
    ("/v1/chat/completions", {"model": GPT, "messages": [], "stream": True,
                              "stream_options": {"include_usage": True}}, True),
    ("/chat/completions", {"model": CLAUDE, "messages": [], "stream": True}, True),  # sidecar adds include_usage
    ("/v1/messages", {"model": CLAUDE, "max_tokens": 10, "messages": []}, False),
    ("/v1/messages", {"model": CLAUDE, "max_tokens": 10, "messages": [], "stream": True}, True),
    ("/responses", {"model": GPT, "input": "hi"}, False),
    ("/v1/responses", {"model": GPT, "input": "hi", "stream": True}, True),
]


def test_mixed_run_spend_in_mongodb_equals_what_upstream_charged(sidecar, upstream, mongo_db):
    upstream.add_key(KEY_A, budget=100)
    upstream.add_key(KEY_B, budget=100)
    sidecar.add_key("ka", KEY_A)
    sidecar.add_key("kb", KEY_B)
    for _round in range(2):
        for i, (path, body, streamed) in enumerate(REQUESTS):
            r = requests.post(sidecar.url + path, json=body, timeout=15, stream=streamed,
                              headers={"x-litellm-session-id": f"conv-{i % 2}"})
            assert r.status_code == 200, r.text
            if streamed:
                assert b"".join(r.iter_content(None))
    charged = {"ka": upstream.spend(KEY_A), "kb": upstream.spend(KEY_B)}
    assert sum(charged.values()) > 0

    def matches():
        got = {d["_id"]: d["spendEstimate"] for d in mongo_db.openhands_keys.find()}
        assert all(abs(got[k] - charged[k]) < 1e-9 for k in charged), (got, charged)  # shown on timeout
        return True

    eventually(matches)
    docs = {d["_id"]: d for d in mongo_db.openhands_keys.find()}
    assert sum(d["requestsCount"] for d in docs.values()) == 2 * len(REQUESTS)
    assert all(d["tokensUsed"] > 0 and d["lastUsedAt"] is not None for d in docs.values())


def test_streamed_chat_without_include_usage_is_metered_and_client_sees_no_usage_chunk(sidecar, upstream, mongo_db):
    upstream.add_key(KEY_A, budget=100)
    sidecar.add_key("ka", KEY_A)
    r = requests.post(sidecar.url + "/chat/completions", json={"model": CLAUDE, "messages": [], "stream": True},
                      timeout=15)
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and not any(c.get("usage") for c in chunks)
    sent = upstream.requests[-1].json()
    assert sent["stream_options"] == {"include_usage": True}  # the sidecar asked for usage upstream
    eventually(lambda: abs(mongo_db.openhands_keys.find_one({"_id": "ka"})["spendEstimate"]
                           - upstream.spend(KEY_A)) < 1e-9)
    assert upstream.spend(KEY_A) == pytest.approx(0.015036, abs=1e-9)


def test_client_that_asked_for_usage_still_gets_it(sidecar, upstream):
    upstream.add_key(KEY_A, budget=100)
    sidecar.add_key("ka", KEY_A)
    r = requests.post(sidecar.url + "/chat/completions", timeout=15, json={
        "model": CLAUDE, "messages": [], "stream": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks[-1]["usage"]["prompt_tokens"] == 31512


def test_stream_reaches_client_before_upstream_finishes(sidecar_factory, upstream):
    upstream.add_key(KEY_A, budget=100)
    sc = sidecar_factory()
    sc.add_key("ka", KEY_A)
    started = time.monotonic()
    r = requests.post(sc.url + "/chat/completions", stream=True, timeout=30,
                      json={"model": CLAUDE, "messages": [], "stream": True},
                      headers={"x-fake-stream-events": "10", "x-fake-event-delay": "0.2"})
    chunks = r.iter_content(None)
    first = next(chunks)
    first_at = time.monotonic() - started
    rest = b"".join(chunks)
    total = time.monotonic() - started
    assert first and rest.endswith(b"data: [DONE]\n\n")
    assert first_at < total / 2, (first_at, total)  # ~0.2 s vs ~2 s: streamed, not buffered


def test_flow_metadata_records_key_model_tokens_and_cost(sidecar, upstream):
    """The comment line is what mitmweb shows; check it through a flow dump."""
    upstream.add_key(KEY_A, budget=100)
    sidecar.add_key("ka", KEY_A)
    r = requests.post(sidecar.url + "/chat/completions", json={"model": CLAUDE, "messages": []}, timeout=15)
    assert r.status_code == 200
    assert float(r.headers["x-litellm-response-cost"]) == pytest.approx(0.015036)
    keys = sidecar.keys()
    assert keys["ka"]["spendEstimate"] == pytest.approx(0.015036, abs=1e-6)
    assert keys["ka"]["tokensUsed"] == 12 + 1500 + 30000 + 25


def test_key_spend_header_raises_estimate(sidecar_factory, upstream, mongo_db):
    upstream.send_key_spend_header = True
    upstream.add_key(KEY_A, budget=100, spend=4.0)  # spent elsewhere, unknown to the sidecar
    sc = sidecar_factory()
    sc.add_key("ka", KEY_A)
    r = requests.post(sc.url + "/chat/completions", json={"model": CLAUDE, "messages": []}, timeout=15)
    assert r.status_code == 200
    eventually(lambda: mongo_db.openhands_keys.find_one({"_id": "ka"})["spendEstimate"]
               == pytest.approx(4.0 + 0.015036, abs=1e-9))


@pytest.mark.parametrize("absurd", ["1e12", "1e308"])
def test_an_absurd_key_spend_header_retires_nothing_and_moves_no_spend(sidecar_factory, upstream, mongo_db, absurd):
    """A buggy or hostile upstream claims a $10 key spent a trillion dollars on answers it served: the
    figure cannot be true, so it is ignored (one warning) and the key keeps serving on our meter."""
    upstream.send_key_spend_header = True
    upstream.key_spend_header_value = absurd
    upstream.add_key(KEY_A, budget=10)
    sc = sidecar_factory()
    sc.add_key("ka", KEY_A)
    for _ in range(3):
        r = requests.post(sc.url + "/chat/completions", json={"model": CLAUDE, "messages": []}, timeout=15)
        assert r.status_code == 200
    eventually(lambda: mongo_db.openhands_keys.find_one({"_id": "ka"})["spendEstimate"]
               == pytest.approx(3 * 0.015036, abs=1e-9))
    eventually(lambda: sc.out.count(r"ignored x-litellm-key-spend") == 1)
    assert sc.keys()["ka"]["status"] == "healthy"


def test_unknown_model_uses_fallback_price_and_warns_once(sidecar_factory, upstream):
    upstream.add_key(KEY_A, budget=100)
    sc = sidecar_factory(env={"OPENHANDS_FALLBACK_PRICE": "2:8"})
    sc.add_key("ka", KEY_A)
    for _ in range(3):
        r = requests.post(sc.url + "/v1/messages", json={"model": "mystery-model-9", "max_tokens": 5, "messages": []},
                          timeout=15)
        assert r.status_code == 200
    eventually(lambda: sc.out.count(r"no price for model 'mystery-model-9'") == 1)
    assert sc.keys()["ka"]["spendEstimate"] > 0
    # Every warning the three requests could log was written before this admin call's flow line.
    eventually(lambda: sc.out.count(r": GET \S+/admin/openhands/keys") >= 1)
    assert sc.out.count(r"no price for model 'mystery-model-9'") == 1
