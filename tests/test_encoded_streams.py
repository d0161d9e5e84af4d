"""An event stream the upstream compressed although the sidecar asked for `accept-encoding: identity`
(issue 16 §7): gzip and deflate are decoded for metering while the client gets the bytes as sent;
anything else is streamed through unmetered with one warning."""
from __future__ import annotations

import gzip
import json
import logging
import zlib

import pytest
from mitmproxy import http

from addon.core.sse import EncodedSSETap
from tests.test_sse import SAMPLES
from tests.test_traffic_unit import CHAT, drive, flow, running_rig, state

CHUNK_SIZES = [1, 7, 64, 4096]


@pytest.fixture
def rig(tmp_path):
    with running_rig(tmp_path) as r:
        yield r


def _deflate(body: bytes) -> bytes:
    return zlib.compress(body)


def _encoded_cases():
    for name, fmt, body, expected, _stripped in SAMPLES:
        yield pytest.param(fmt, body, expected, "gzip", gzip.compress(body), id=f"{name}-gzip")
        yield pytest.param(fmt, body, expected, "deflate", _deflate(body), id=f"{name}-deflate")


@pytest.mark.parametrize("size", CHUNK_SIZES)
@pytest.mark.parametrize("fmt,plain,expected,encoding,encoded", list(_encoded_cases()))
def test_a_compressed_stream_reaches_the_client_as_sent_and_is_metered_as_if_plain(fmt, plain, expected, encoding,
                                                                                    encoded, size):
    tap = EncodedSSETap(fmt, encoding)
    out = b""
    for i in range(0, len(encoded), size):
        piece = tap(encoded[i:i + size])
        out += piece if isinstance(piece, bytes) else b"".join(piece)
    end = tap(b"")
    assert end == [] or end == b""
    assert out == encoded  # byte for byte what the upstream sent
    assert tap.usage == expected


def test_garbage_under_a_gzip_label_is_passed_through_and_never_raises():
    tap = EncodedSSETap("chat", "gzip")
    data = b"this is not gzip at all\n\n"
    assert tap(data) == data and tap(b"") in ([], b"")
    assert tap.usage is None and tap.errors >= 1


@pytest.mark.parametrize("encoding,tapped", [("gzip", True), ("deflate", True), ("br", False), ("zstd", False)])
def test_the_request_path_decodes_what_it_can_and_warns_once_about_the_rest(rig, caplog, encoding, tapped):
    caplog.set_level(logging.WARNING)
    rig.add("k1")
    for _ in range(2):
        f = rig.request(flow(body={**CHAT, "stream": True}))
        f.response = http.Response.make(200, b"", {"content-type": "text/event-stream",
                                                   "content-encoding": encoding})
        rig.traffic.responseheaders(f)
        assert isinstance(f.response.stream, EncodedSSETap) is tapped
        assert bool(f.response.stream)  # streamed either way: the client's first byte never waits
    warnings = [r.getMessage() for r in caplog.records if "compressed an event stream" in r.getMessage()]
    assert len(warnings) == 1 and encoding in warnings[0]
    if not tapped:
        assert "NOT metered" in warnings[0]


def test_a_gzip_stream_through_the_hooks_charges_the_key(rig):
    rig.add("k1")
    f = rig.request(flow(body={**CHAT, "stream": True, "stream_options": {"include_usage": True}}))
    f.response = http.Response.make(200, b"", {"content-type": "text/event-stream", "content-encoding": "gzip"})
    rig.traffic.responseheaders(f)
    usage = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 100,
                                                  "total_tokens": 1100, "cost": 0.25}}
    body = gzip.compress(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
    tap = f.response.stream
    assert tap(body) == body
    tap(b"")
    drive(rig.traffic.response(f))
    assert state(f).metered and rig.pool.get("k1").spend_estimate == pytest.approx(0.25)
