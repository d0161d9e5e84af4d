"""Tests of the fake LiteLLM upstream against /work/shared/reference/litellm-upstream.md."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.fake_upstream import FakeUpstream, hash_key

ROOT = Path(__file__).resolve().parents[1]
CLAUDE = "claude-sonnet-4-5-20250929"
GPT = "gpt-5-mini-2025-08-07"
AUTH = {"Authorization": "Bearer sk-a"}


@pytest.fixture
def fake():
    with FakeUpstream() as f:
        f.add_key("sk-a", 10.0)
        yield f


def post(fake, path, body, headers=AUTH, **kw):
    return requests.post(fake.url + path, json=body, headers=headers, timeout=5, **kw)


def sse_data(text: str) -> list[str]:
    """The data payloads of an SSE body, in order."""
    out = []
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                out.append(line[6:])
    return out


def sse_events(text: str) -> list[tuple[str | None, dict]]:
    out = []
    for block in text.strip().split("\n\n"):
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
        out.append((name, data))
    return out


# ---- budget ---------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [400, 422, 429])
@pytest.mark.parametrize("style,expected", [
    ("user", "ExceededBudget: User=u-1 over budget. Spend=0.04, Budget=0.03"),
    ("team", "Budget has been exceeded! Team=org-9 Current cost: 0.04, Max budget: 0.03"),
    ("key", "Budget has been exceeded! Current cost: 0.04, Max budget: 0.03"),
])
def test_budget_admit_overshoot_reject(status, style, expected):
    with FakeUpstream(budget_status=status, budget_message=style, cost_per_request=0.02) as f:
        f.add_key("sk-a", budget=0.03, user_id="u-1", team_id="org-9")
        assert post(f, "/chat/completions", {"model": GPT}).status_code == 200
        assert post(f, "/chat/completions", {"model": GPT}).status_code == 200  # 0.02 < 0.03: admitted
        assert f.spend("sk-a") == pytest.approx(0.04)  # overshoot
        r = post(f, "/chat/completions", {"model": GPT})
        assert r.status_code == status
        assert r.json() == {"error": {"message": expected.replace("0.04", str(f.spend("sk-a"))),
                                      "type": "budget_exceeded", "param": None, "code": str(status)}}
        assert f.spend("sk-a") == pytest.approx(0.04)  # rejected requests cost nothing
        assert f.budget_errors("sk-a") == 1 and f.admitted_count("sk-a") == 2


def test_budget_rejects_at_exactly_budget_and_cycles():
    with FakeUpstream(budget_status="cycle", budget_message="cycle") as f:
        f.add_key("sk-a", budget=5.0, spend=5.0)
        got = [post(f, "/v1/chat/completions", {"model": GPT}) for _ in range(4)]
        assert [r.status_code for r in got] == [400, 422, 429, 400]
        msgs = [r.json()["error"]["message"] for r in got]
        assert msgs[0].startswith("ExceededBudget: User=") and msgs[0].endswith("Spend=5.0, Budget=5.0")
        assert msgs[1].startswith("Budget has been exceeded! Team=")
        assert msgs[2] == "Budget has been exceeded! Current cost: 5.0, Max budget: 5.0"
        assert [r.json()["error"]["code"] for r in got] == ["400", "422", "429", "400"]


def test_budget_error_on_stream_is_plain_json_all_routes(fake):
    fake.set_spend("sk-a", 10.5)
    for path in ("/chat/completions", "/v1/messages", "/responses", "/v1/responses"):
        r = post(fake, path, {"model": CLAUDE, "stream": True})
        assert r.status_code == 400
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["type"] == "budget_exceeded"  # OpenAI envelope on /v1/messages too (1.80)


@pytest.mark.parametrize("status,etype", [(422, "invalid_request_error"), (429, "rate_limit_error")])
def test_anthropic_envelope_on_messages(status, etype):
    with FakeUpstream(budget_status=status, budget_message="team", anthropic_envelope_for_messages=True) as f:
        f.add_key("sk-a", budget=1.0, spend=2.0, team_id="org-1")
        r = post(f, "/v1/messages", {"model": CLAUDE}, headers={"x-api-key": "sk-a", "x-request-id": "req-7"})
        assert r.status_code == status
        assert r.json() == {"type": "error", "request_id": "req-7", "error": {
            "type": etype, "message": "Budget has been exceeded! Team=org-1 Current cost: 2.0, Max budget: 1.0",
            "litellm_error_type": "budget_exceeded"}}
        r = post(f, "/chat/completions", {"model": CLAUDE})  # other routes keep the OpenAI envelope
        assert r.json()["error"]["type"] == "budget_exceeded"


def test_inflight_requests_all_overshoot():
    with FakeUpstream(cost_per_request=1.0, stream_events=3, event_delay=0.1) as f:
        f.add_key("sk-a", budget=1.5)
        results = []

        def go():
            results.append(post(f, "/chat/completions", {"model": GPT, "stream": True}).status_code)

        ts = [threading.Thread(target=go) for _ in range(4)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert results == [200] * 4
        assert f.spend("sk-a") == pytest.approx(4.0)
        assert post(f, "/chat/completions", {"model": GPT}).status_code == 400


# ---- auth and recording -----------------------------------------------------------------------

def test_auth_errors_and_credential_order(fake):
    r = post(fake, "/chat/completions", {"model": GPT}, headers={})
    assert r.status_code == 401
    assert r.json()["error"] == {"message": "Authentication Error, No api key passed in.", "type": "auth_error",
                                 "param": "None", "code": "401"}
    r = post(fake, "/chat/completions", {"model": GPT}, headers={"Authorization": "Bearer sk-nope"})
    assert r.status_code == 401 and r.json()["error"]["message"].startswith("Authentication Error, ")
    fake.add_key("sk-b", 10)
    fake.clear_requests()
    # x-litellm-api-key (raw or Bearer) wins over Authorization; then Authorization; then x-api-key
    post(fake, "/chat/completions", {"model": GPT}, headers={"x-litellm-api-key": "Bearer sk-b", **AUTH})
    post(fake, "/chat/completions", {"model": GPT}, headers={"x-litellm-api-key": "sk-b", "x-api-key": "sk-a"})
    post(fake, "/chat/completions", {"model": GPT}, headers={"x-api-key": "sk-b", **AUTH})
    post(fake, "/v1/messages", {"model": CLAUDE}, headers={"x-api-key": "sk-a"})
    got = [(r.credential, r.header_used) for r in fake.requests]
    assert got == [("sk-b", "x-litellm-api-key"), ("sk-b", "x-litellm-api-key"), ("sk-a", "authorization"),
                   ("sk-a", "x-api-key")]
    rec = fake.requests[0]
    assert rec.method == "POST" and rec.path == "/chat/completions" and rec.json() == {"model": GPT}
    assert rec.headers["x-litellm-api-key"] == "Bearer sk-b" and rec.headers["authorization"] == "Bearer sk-a"
    assert fake.request_count("sk-b") == 2 and fake.request_count("sk-a") == 2


# ---- usage shapes (reference §3) -----------------------------------------------------------

def test_chat_json_anthropic_and_openai(fake):
    fake.send_key_spend_header = True
    r = post(fake, "/chat/completions", {"model": CLAUDE})
    assert r.status_code == 200
    assert r.json()["usage"] == {
        "completion_tokens": 25, "prompt_tokens": 31512, "total_tokens": 31537,
        "prompt_tokens_details": {"cached_tokens": 30000, "cache_creation_tokens": 1500,
                                  "cache_creation_token_details": {"ephemeral_5m_input_tokens": 1500,
                                                                   "ephemeral_1h_input_tokens": 0}},
        "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 30000}
    assert float(r.headers["x-litellm-response-cost"]) == pytest.approx(0.015036)
    assert r.headers["x-litellm-key-spend"] == "0.0"
    assert r.headers["x-litellm-version"] == "1.80.0"
    assert r.headers["x-litellm-call-id"] and r.headers["x-litellm-model-id"]
    r = post(fake, "/v1/chat/completions", {"model": GPT})
    assert r.json()["usage"] == {
        "completion_tokens": 300, "prompt_tokens": 31500, "total_tokens": 31800,
        "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0, "reasoning_tokens": 256,
                                      "rejected_prediction_tokens": 0},
        "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 30000}}
    assert float(r.headers["x-litellm-response-cost"]) == pytest.approx(0.001725)
    assert float(r.headers["x-litellm-key-spend"]) == pytest.approx(0.015036)
    assert fake.spend("sk-a") == pytest.approx(0.015036 + 0.001725)


def test_chat_sse_include_usage(fake):
    r = post(fake, "/chat/completions", {"model": CLAUDE, "stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["transfer-encoding"] == "chunked"
    assert "x-litellm-response-cost" not in r.headers
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len(chunks) == 5 + 2
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"content": "word0 ", "role": "assistant"}}]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == CLAUDE for c in chunks)
    assert chunks[-2]["choices"] == [{"finish_reason": "stop", "index": 0, "delta": {}}]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}}]
    assert chunks[-1]["usage"] == {
        "completion_tokens": 25, "prompt_tokens": 31512, "total_tokens": 31537,
        "completion_tokens_details": {"reasoning_tokens": 0},
        "prompt_tokens_details": {"cached_tokens": 30000, "cache_creation_tokens": 1500},
        "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 30000}
    assert fake.spend("sk-a") == pytest.approx(0.015036)
    r = post(fake, "/chat/completions", {"model": GPT, "stream": True, "stream_options": {"include_usage": True}})
    usage = json.loads(sse_data(r.text)[-2])["usage"]
    assert usage["prompt_tokens"] == 31500 and usage["prompt_tokens_details"]["cached_tokens"] == 30000
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 256


def test_chat_sse_without_include_usage_has_no_usage(fake):
    r = post(fake, "/chat/completions", {"model": GPT, "stream": True})
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    assert all("usage" not in json.loads(d) for d in data[:-1])
    assert json.loads(data[-2])["choices"][0]["finish_reason"] == "stop"
    assert fake.spend("sk-a") == pytest.approx(0.001725)  # charged all the same


def test_messages_json_and_sse(fake):
    r = post(fake, "/v1/messages", {"model": CLAUDE}, headers={"x-api-key": "sk-a"})
    assert "x-litellm-response-cost" not in r.headers
    body = r.json()
    assert body["type"] == "message" and body["usage"] == {
        "input_tokens": 12, "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 30000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 25, "service_tier": "standard"}
    r = post(fake, "/v1/messages", {"model": CLAUDE, "stream": True}, headers={"x-api-key": "sk-a"})
    assert "x-litellm-response-cost" not in r.headers
    evs = sse_events(r.text)
    names = [n for n, _ in evs]
    assert names == (["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 5
                     + ["content_block_stop", "message_delta", "message_stop"])
    assert all(d["type"] == n for n, d in evs)
    start = evs[0][1]["message"]["usage"]
    assert (start["input_tokens"], start["cache_creation_input_tokens"], start["cache_read_input_tokens"]) == \
        (12, 1500, 30000)
    assert evs[-2][1]["usage"] == {"input_tokens": 12, "cache_creation_input_tokens": 1500,
                                   "cache_read_input_tokens": 30000, "output_tokens": 25}
    assert "data: {\"type\": \"message_start\"" in r.text  # LiteLLM's json.dumps spacing
    # bridged to a non-Anthropic model
    assert post(fake, "/v1/messages", {"model": GPT}).json()["usage"] == {"input_tokens": 31500, "output_tokens": 300}
    evs = sse_events(post(fake, "/v1/messages", {"model": GPT, "stream": True}).text)
    assert evs[0][1]["message"]["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert evs[-2][1]["usage"] == {"input_tokens": 31500, "output_tokens": 300}
    assert fake.spend("sk-a") == pytest.approx(2 * 0.015036 + 2 * 0.001725)


def test_responses_json_and_sse(fake):
    r = post(fake, "/responses", {"model": GPT, "input": "hi"})
    assert float(r.headers["x-litellm-response-cost"]) == pytest.approx(0.001725)
    b = r.json()
    assert b["object"] == "response" and b["status"] == "completed" and b["id"].startswith("resp_")
    u = b["usage"]
    assert (u["input_tokens"], u["input_tokens_details"]["cached_tokens"], u["output_tokens"],
            u["output_tokens_details"], u["total_tokens"]) == (31500, 30000, 300, {"reasoning_tokens": 256}, 31800)
    assert u["cost"] is None
    r = post(fake, "/v1/responses", {"model": GPT, "stream": True})
    assert "x-litellm-response-cost" not in r.headers
    assert "event:" not in r.text
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    evs = [json.loads(d) for d in data[:-1]]
    assert evs[0]["type"] == "response.created" and evs[-1]["type"] == "response.completed"
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert sum(e["type"] == "response.output_text.delta" for e in evs) == 5
    assert all("usage" not in e or e["response"]["usage"] is None for e in evs[:-1])
    assert evs[-1]["response"]["usage"] == {"input_tokens": 31500, "input_tokens_details": {"cached_tokens": 30000},
                                            "output_tokens": 300, "output_tokens_details": {"reasoning_tokens": 256},
                                            "total_tokens": 31800}
    assert evs[0]["response"]["usage"] is None
    # Anthropic model bridged: cache folded in, no details
    u = post(fake, "/responses", {"model": CLAUDE}).json()["usage"]
    assert u == {"input_tokens": 31512, "output_tokens": 25, "total_tokens": 31537}


def test_usage_override_header_and_prices():
    prices = {"m-claude-x": (2.0, 10.0, 4.0, 0.5), "gpt-x": (1.0, 8.0, 0.0, 0.1)}
    with FakeUpstream(prices=prices, default_price=(1.0, 1.0, 1.0, 1.0)) as f:
        f.add_key("sk-a", 100)
        hdr = {**AUTH, "x-fake-usage": json.dumps({"input": 1000, "cache_write": 2000, "cache_read": 3000,
                                                    "output": 4000})}
        r = post(f, "/chat/completions", {"model": "m-claude-x"}, headers=hdr)
        assert r.json()["usage"]["prompt_tokens"] == 6000 and r.json()["usage"]["completion_tokens"] == 4000
        assert float(r.headers["x-litellm-response-cost"]) == pytest.approx((2000 + 8000 + 1500 + 40000) / 1e6)
        # OpenAI shape: no cache writes in usage, so LiteLLM bills them as uncached input
        r = post(f, "/chat/completions", {"model": "gpt-x"}, headers=hdr)
        assert r.json()["usage"]["prompt_tokens"] == 6000
        assert float(r.headers["x-litellm-response-cost"]) == pytest.approx((3000 + 300 + 32000) / 1e6)
        r = post(f, "/chat/completions", {"model": "unknown-model"}, headers=hdr)  # default price
        assert float(r.headers["x-litellm-response-cost"]) == pytest.approx(10000 / 1e6)
        info = requests.get(f.url + "/v1/model/info", headers=AUTH, timeout=5).json()
        entry = next(d for d in info["data"] if d["model_name"] == "m-claude-x")
        assert entry["litellm_params"]["model"].endswith("m-claude-x")
        mi = entry["model_info"]
        assert (mi["input_cost_per_token"], mi["output_cost_per_token"], mi["cache_creation_input_token_cost"],
                mi["cache_read_input_token_cost"]) == pytest.approx((2e-6, 10e-6, 4e-6, 0.5e-6))
        models = requests.get(f.url + "/v1/models", headers=AUTH, timeout=5).json()
        assert {m["id"] for m in models["data"]} == set(prices)
        assert requests.get(f.url + "/v1/model/info", timeout=5).status_code == 401
        r = requests.get(f.url + "/key/whatever", headers=AUTH, timeout=5)
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def test_bad_request_body(fake):
    r = requests.post(fake.url + "/chat/completions", data=b"{not json", headers=AUTH, timeout=5)
    assert r.status_code == 400
    assert post(fake, "/chat/completions", {"messages": []}).status_code == 400
    assert fake.spend("sk-a") == 0


# ---- stream knobs ---------------------------------------------------------------------------

def test_stream_knobs(fake):
    fake.stream_events, fake.event_padding = 12, 1000
    r = post(fake, "/chat/completions", {"model": GPT, "stream": True})
    chunks = [json.loads(d) for d in sse_data(r.text)[:-1]]
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"][0]["delta"].get("content")]
    assert len(deltas) == 12 and all(len(d) >= 1000 for d in deltas)
    hdr = {**AUTH, "x-fake-stream-events": "3", "x-fake-event-delay": "0.1"}
    t0 = time.monotonic()
    r = post(fake, "/chat/completions", {"model": GPT, "stream": True}, headers=hdr)
    assert time.monotonic() - t0 >= 0.35  # 3 deltas + finish + [DONE]: 4 gaps
    assert len(sse_data(r.text)) == 3 + 2


def test_stream_of_given_total_size_is_streamed(fake):
    total = 20 * 1024 * 1024
    hdr = {**AUTH, "x-fake-stream-bytes": str(total)}
    got = 0
    with requests.post(fake.url + "/responses", json={"model": GPT, "stream": True}, headers=hdr, stream=True,
                       timeout=10) as r:
        it = r.raw.stream(1 << 20, decode_content=False)
        first = next(it)
        assert first.startswith(b"data: {\"type\":\"response.created\"")
        got = len(first) + sum(len(c) for c in it)
    assert total < got < total * 1.1
    assert fake.spend("sk-a") == pytest.approx(0.001725)


# ---- faults -----------------------------------------------------------------------------------

def test_scripted_status_faults_fifo(fake):
    fake.script({"status": 429, "body": {"error": {"message": "Rate limited", "type": "rate_limit", "param": None,
                                                   "code": "429"}}, "headers": {"Retry-After": "7"}},
                {"status": 401}, {"status": 403}, {"status": 500})
    r = post(fake, "/chat/completions", {"model": GPT})
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["type"] != "budget_exceeded"
    assert [post(fake, "/chat/completions", {"model": GPT}).status_code for _ in range(4)] == [401, 403, 500, 200]
    assert fake.spend("sk-a") == pytest.approx(0.001725)
    assert fake.budget_errors("sk-a") == 0


def test_key_fault_until_cleared(fake):
    fake.add_key("sk-b", 10)
    fake.set_key_fault("sk-a", 403)
    assert post(fake, "/chat/completions", {"model": GPT}).status_code == 403
    assert post(fake, "/chat/completions", {"model": GPT}).json()["error"]["code"] == "403"
    assert post(fake, "/chat/completions", {"model": GPT}, headers={"x-api-key": "sk-b"}).status_code == 200
    fake.set_key_fault("sk-a", 429, body={"error": {"message": "slow down"}}, headers={"Retry-After": "3"})
    r = post(fake, "/chat/completions", {"model": GPT})
    assert (r.status_code, r.headers["retry-after"], r.json()) == (429, "3", {"error": {"message": "slow down"}})
    fake.clear_key_fault("sk-a")
    assert post(fake, "/chat/completions", {"model": GPT}).status_code == 200


def test_scripted_hang_times_out_and_stop_releases(fake):
    fake.script({"hang": True})
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(fake.url + "/chat/completions", json={"model": GPT}, headers=AUTH, timeout=0.3)
    fake.script({"hang": True})
    errors = []

    def go():
        try:
            requests.post(fake.url + "/chat/completions", json={"model": GPT}, headers=AUTH, timeout=10)
        except requests.RequestException as e:
            errors.append(e)

    t = threading.Thread(target=go)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    fake.stop()
    t.join(5)
    assert not t.is_alive() and errors and time.monotonic() - t0 < 3


def test_reset_after_events_aborts_chunked_body(fake):
    fake.script({"reset_after_events": 2})
    c = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    c.request("POST", "/chat/completions", body=json.dumps({"model": GPT, "stream": True}),
              headers={**AUTH, "content-type": "application/json"})
    resp = c.getresponse()
    assert resp.status == 200 and resp.getheader("transfer-encoding") == "chunked"
    raw = b""
    with pytest.raises(http.client.IncompleteRead) as ei:
        raw = resp.read()
    raw = ei.value.partial
    assert raw.count(b"data: ") == 2 and b"[DONE]" not in raw
    assert fake.spend("sk-a") == 0  # aborted before usage
    assert post(fake, "/chat/completions", {"model": GPT}).status_code == 200  # next request is normal


def test_malformed_json_and_sse(fake):
    fake.script({"malformed": True}, {"malformed": True})
    r = post(fake, "/chat/completions", {"model": GPT})
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    r = post(fake, "/chat/completions", {"model": GPT, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    data = sse_data(r.text)
    assert "[DONE]" not in data
    bad = 0
    for d in data:
        try:
            json.loads(d)
        except ValueError:
            bad += 1
    assert bad >= 1 and "usage" not in r.text


# ---- /user/daily/activity ----------------------------------------------------------------------

def activity(fake, key="sk-a", **q):
    params = {"start_date": "2020-01-01", "end_date": "2030-12-31", **q}
    return requests.get(fake.url + "/user/daily/activity", params=params, headers={"x-litellm-api-key": key},
                        timeout=5)


def test_activity_requires_dates(fake):
    r = requests.get(fake.url + "/user/daily/activity", params={"start_date": "2020-01-01"},
                     headers={"x-litellm-api-key": "sk-a"}, timeout=5)
    assert r.status_code == 400 and r.json() == {"error": "Please provide start_date and end_date"}
    assert activity(fake, key="sk-zzz").status_code == 401
    assert activity(fake, page_size=1001).status_code == 422


def test_activity_paging_sums_only_current_page(fake):
    fake.cost_per_request = 0.25
    fake.add_key("sk-a", 10, spend=1.0)  # initial spend shows as one row
    for _ in range(6):
        assert post(fake, "/chat/completions", {"model": GPT}).status_code == 200
    assert fake.spend("sk-a") == pytest.approx(2.5)
    body = activity(fake).json()
    assert body["metadata"]["total_spend"] == pytest.approx(2.5)
    assert (body["metadata"]["page"], body["metadata"]["total_pages"], body["metadata"]["has_more"]) == (1, 1, False)
    assert body["metadata"]["total_api_requests"] == 7
    total, page, seen = 0.0, 1, []
    while True:
        b = activity(fake, page=page, page_size=3).json()
        seen.append(b["metadata"]["total_spend"])
        assert b["metadata"]["total_pages"] == 3
        assert b["metadata"]["total_spend"] == pytest.approx(sum(d["metrics"]["spend"] for d in b["results"]))
        total += b["metadata"]["total_spend"]
        if not b["metadata"]["has_more"]:
            break
        page += 1
    assert page == 3 and total == pytest.approx(2.5) and seen[0] < 2.5
    res = body["results"][0]
    assert set(res) == {"date", "metrics", "breakdown"}
    assert set(res["breakdown"]) >= {"models", "model_groups", "providers", "mcp_servers", "entities", "api_keys"}
    assert hash_key("sk-a") in res["breakdown"]["api_keys"]
    assert set(res["metrics"]) == {"spend", "prompt_tokens", "completion_tokens", "cache_read_input_tokens",
                                   "cache_creation_input_tokens", "total_tokens", "successful_requests",
                                   "failed_requests", "api_requests"}
    assert fake.activity_calls("sk-a") == 4
    fake.activity_rows = "model_day"
    b = activity(fake).json()
    assert b["metadata"]["total_spend"] == pytest.approx(2.5) and b["metadata"]["total_pages"] == 1


def test_activity_lag_with_fake_clock():
    now = [1_764_000_000.0]
    with FakeUpstream(clock=lambda: now[0], activity_lag_seconds=15, cost_per_request=0.5) as f:
        f.add_key("sk-a", 10)
        post(f, "/chat/completions", {"model": GPT})
        assert f.spend("sk-a") == 0.5
        assert activity(f).json()["metadata"]["total_spend"] == 0
        now[0] += 14
        assert activity(f).json()["metadata"]["total_spend"] == 0
        now[0] += 2
        b = activity(f).json()
        assert b["metadata"]["total_spend"] == 0.5 and b["results"][0]["date"] == "2025-11-24"
        assert activity(f, start_date="2025-11-25").json()["metadata"]["total_spend"] == 0


def test_activity_budget_errors(fake):
    fake.activity_budget_errors = True
    fake.set_spend("sk-a", 10.0)
    r = activity(fake)
    assert r.status_code == 400 and r.json()["error"]["type"] == "budget_exceeded"
    fake.activity_budget_errors = False
    assert activity(fake).status_code == 200


def test_activity_faults(fake):
    fake.activity_timeout_seconds = 1.0
    fake.set_activity_fault("timeout")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(fake.url + "/user/daily/activity", params={"start_date": "2020-01-01", "end_date": "2030-12-31"},
                     headers={"x-litellm-api-key": "sk-a"}, timeout=0.3)
    fake.set_activity_fault("500")
    assert activity(fake).status_code == 500
    fake.set_activity_fault("401")
    assert activity(fake).status_code == 401
    fake.set_activity_fault("malformed")
    r = activity(fake)
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    fake.set_activity_fault(None)
    assert activity(fake).status_code == 200
    with pytest.raises(ValueError):
        fake.set_activity_fault("bogus")


# ---- admin surface and CLI ------------------------------------------------------------------

def test_admin_surface(fake):
    r = requests.post(fake.url + "/_fake/keys", json={"api_key": "sk-x", "budget": 2.0, "spend": 1.5}, timeout=5)
    assert r.status_code == 201
    assert fake.spend("sk-x") == 1.5 and fake.budget("sk-x") == 2.0
    requests.post(fake.url + "/_fake/config", json={"cost_per_request": 1.0}, timeout=5)
    post(fake, "/chat/completions", {"model": GPT}, headers={"x-api-key": "sk-x"})
    post(fake, "/chat/completions", {"model": GPT}, headers={"x-api-key": "sk-x"})
    st = requests.get(fake.url + "/_fake/state", timeout=5).json()
    assert st["keys"]["sk-x"]["spend"] == 2.5
    assert st["keys"]["sk-x"]["requests"] == 2 and st["keys"]["sk-x"]["budget_errors"] == 1
    assert st["budget_errors_total"] == 1
    assert requests.post(fake.url + "/_fake/keys", json={"budget": 1}, timeout=5).status_code == 400


def test_cli_prints_port_and_stops_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", "0", "--keys", "k1:10,k2:5:4.5",
                             "--budget-status", "cycle", "--cost-per-request", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("fake-upstream listening on 127.0.0.1:")
        port = int(line.strip().rsplit(":", 1)[1])
        url = f"http://127.0.0.1:{port}"
        assert requests.post(url + "/chat/completions", json={"model": GPT}, headers={"x-api-key": "k2"},
                             timeout=5).status_code == 200
        r = requests.post(url + "/chat/completions", json={"model": GPT}, headers={"x-api-key": "k2"}, timeout=5)
        assert r.status_code == 400 and r.json()["error"]["type"] == "budget_exceeded"
        st = requests.get(url + "/_fake/state", timeout=5).json()
        assert st["keys"]["k2"]["spend"] == 5.5 and st["keys"]["k1"]["budget"] == 10
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert proc.stdout.read() == ""  # exactly one line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
