"""The fake's first-event gap: the streaming benchmark times a proxy's first byte on streams whose first event
the fake sends alone, so the gap must hold the rest back and change nothing on the wire."""
from __future__ import annotations

import itertools
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests import fake_upstream
from tests.fake_upstream import FakeUpstream

GPT = "gpt-5-mini-2025-08-07"
Stream = Callable[[str, dict[str, str]], tuple[bytes, float]]


@pytest.fixture
def stream(monkeypatch) -> Iterator[Stream]:
    """Streams from a fake whose ids, dates and clock restart for every answer: the same request, the same bytes."""
    ids = [itertools.count()]
    monkeypatch.setattr(fake_upstream.uuid, "uuid4", lambda: uuid.UUID(int=next(ids[0])))
    monkeypatch.setattr(fake_upstream, "_http_date", lambda: "Wed, 02 Dec 2026 00:00:00 GMT")
    with FakeUpstream(clock=lambda: 1764633600.0) as fake:
        fake.add_key("sk-a", 1e6)

        def one(path: str, headers: dict[str, str]) -> tuple[bytes, float]:
            """The raw answer (head and chunked body) and the seconds from its first event to its last byte."""
            ids[0] = itertools.count()
            body = json.dumps({"model": GPT, "messages": [{"role": "user", "content": "x"}], "stream": True})
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            with socket.create_connection((fake.host, fake.port), timeout=10) as s:
                s.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-a\r\nconnection: close\r\n"
                          f"{extra}content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}"
                          .encode())
                data, t_first = b"", None
                while chunk := s.recv(1 << 16):
                    data += chunk
                    if t_first is None and b"\n\n" in data.partition(b"\r\n\r\n")[2]:
                        t_first = time.monotonic()
            assert t_first is not None
            return data, time.monotonic() - t_first
        yield one


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/messages", "/responses"])
def test_first_event_gap_holds_the_rest_back_and_sends_the_same_bytes(stream, path):
    plain, plain_after_first = stream(path, {"x-fake-stream-events": "50"})
    gapped, gapped_after_first = stream(path, {"x-fake-stream-events": "50", "x-fake-first-event-gap": "0.3"})
    assert gapped_after_first >= 0.3 > plain_after_first
    assert gapped == plain and plain.count(b"\n\n") >= 50
