"""The metering call of `PooledTraffic`: whether the answer's `x-litellm-key-spend` already counts its own
cost is what `spend_is_after` says of all the answer's headers, although the header names are read only
when neither the stream nor a version header can tell."""
from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
from mitmproxy import http

from addon.core.reservation import spend_is_after
from tests.test_pooled_sync import finish
from tests.test_traffic_unit import CHAT, OK_JSON, Rig, flow, running_rig

SSE = (b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,'
       b'"cost":0.02}}\n\ndata: [DONE]\n\n')


@pytest.fixture
def rig(tmp_path) -> Iterator[Rig]:
    with running_rig(tmp_path) as r:
        yield r


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("headers, after", [
    ({"x-litellm-version": "1.110.2"}, True),
    ({"x-litellm-version": "1.80.0"}, False),
    ({"x-litellm-version": "1.80.0", "x-litellm-response-cost-input": "0.01"}, False),  # the version decides
    ({"x-litellm-response-cost-input": "0.01"}, True),     # no version: a per-part cost header is a 1.110 sign
    ({"X-LiteLLM-Response-Cost-Output": "0.01"}, True),    # in any case
    ({}, None),                                            # neither: unknown
    ({"x-litellm-version": "not a version"}, None),
    ({"x-litellm-version": "not a version", "x-litellm-response-cost-input": "0.01"}, True),
    ({"x-litellm-version": ""}, None),
])
def test_the_key_spend_header_is_read_as_spend_is_after_reads_all_the_headers(rig, monkeypatch, headers, after,
                                                                              streamed):
    rig.add("k1")
    seen: list[Any] = []
    real = rig.pool.record_usage

    def record_usage(*a: Any, **kw: Any) -> Any:
        seen.append(kw["spend_is_after"])
        return real(*a, **kw)
    monkeypatch.setattr(rig.pool, "record_usage", record_usage)
    f = rig.request(flow(body={**CHAT, "stream": True} if streamed else CHAT))
    ctype = "text/event-stream" if streamed else "application/json"
    all_headers = {"content-type": ctype, "x-litellm-key-spend": "1.5", "x-litellm-response-cost": "0.02", **headers}
    f.response = http.Response.make(200, SSE if streamed else json.dumps(OK_JSON).encode(), all_headers)
    rig.traffic.responseheaders(f)
    if streamed:
        tap = f.response.stream
        tap(SSE)
        tap(b"")
    pending = rig.traffic.response(f)
    if pending is not None:
        finish(pending)
    names = [n for n, _ in f.response.headers.items(multi=True)]
    assert seen == [spend_is_after(names, streamed, headers.get("x-litellm-version"))]
    assert seen == [False if streamed else after]
