"""The request path reads `model`, `stream` and `stream_options` without building the body: it must read
exactly what `json.loads` reads (LiteLLM parses the body with `json`), whatever the client sent."""
from __future__ import annotations

import json
import random

import pytest

from addon.core import request_body
from addon.core.request_body import RequestFacts, request_facts


def _reference(raw: bytes) -> RequestFacts | None:
    """What the whole body, read by the standard library, says."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    model = body.get("model")
    return RequestFacts(model if isinstance(model, str) else None, body.get("stream") is True,
                        "stream_options" in body)


CASES = [
    (b'{"model":"gpt-5-mini","messages":[{"role":"user","content":"hi"}]}', RequestFacts("gpt-5-mini", False, False)),
    (b'{"messages":[],"model":"m","stream":true}', RequestFacts("m", True, False)),
    (b'{"model":"m","stream":true,"stream_options":{"include_usage":false}}', RequestFacts("m", True, True)),
    (b'{"stream_options":null,"stream":true}', RequestFacts(None, True, True)),  # present, even null
    (b'{"model":"a","model":"b"}', RequestFacts("b", False, False)),  # a repeated member: the last one, as json
    (b'{"model":"m","stream":true,"stream":false}', RequestFacts("m", False, False)),
    (b'{"mod\\u0065l":"escaped name"}', RequestFacts("escaped name", False, False)),
    (b'{"Model":"x","MODEL":"y"}', RequestFacts(None, False, False)),  # names are case-sensitive
    (b'{"model":7,"stream":1}', RequestFacts(None, False, False)),  # not a string, not exactly true
    (b'{"model":null,"stream":"true"}', RequestFacts(None, False, False)),
    (b'{"model":{"model":"nested"},"tools":[{"model":"deeper"}]}', RequestFacts(None, False, False)),
    (b'{"tools":[{"parameters":{"model":{"type":"string"}}}],"model":"top"}', RequestFacts("top", False, False)),
    (b' \n{"model":"spaced"}\n ', RequestFacts("spaced", False, False)),
    (b'{"model":"caf\xc3\xa9 \xe2\x82\xac"}', RequestFacts("caf\u00e9 \u20ac", False, False)),  # UTF-8
    (b'{"model":"m","n":1e400,"big":123456789012345678901234567890}', RequestFacts("m", False, False)),
    # read by json, refused by msgspec: the full parse answers
    (b'{"model":"\\ud800"}', RequestFacts("\ud800", False, False)),  # a lone surrogate
    (b'{"model":"m","x":"\\udc00"}', RequestFacts("m", False, False)),
    (b'{"model":"m","n":NaN,"i":-Infinity}', RequestFacts("m", False, False)),
    (b'\xef\xbb\xbf{"model":"bom"}', RequestFacts("bom", False, False)),
    ('{"model":"utf16"}'.encode("utf-16"), RequestFacts("utf16", False, False)),
    (b'{"model":"m","s":"\xed\xa0\x80"}', RequestFacts("m", False, False)),  # an encoded surrogate: surrogatepass
    # refused by json: not an object body
    (b'{"model":"\xff"}', None),  # not UTF-8 in a member that is read
    (b'{"model":"m","s":"a\xff"', None),
    (b'{"model":"m",}', None),
    (b'{"model":"m"} trailing', None),
    (b'{"model":"m","s":"a\x01b"}', None),
    (b'{"model":"m"', None),
    (b'', None),
    (None, None),  # a request without a body
    (b'null', None),
    (b'[{"model":"m"}]', None),
    (b'"model"', None),
    (b'42', None),
]


@pytest.mark.parametrize("raw, expected", CASES)
def test_facts_are_what_json_reads(raw, expected):
    assert _reference(raw) == expected, "the table itself must say what json reads"
    assert request_facts(raw) == expected


@pytest.mark.parametrize("raw, expected", CASES)
def test_without_msgspec_the_full_parse_answers_the_same(raw, expected, monkeypatch):
    monkeypatch.setattr(request_body, "_DECODER", None)
    assert request_facts(raw) == expected


def test_a_broken_byte_in_a_message_leaves_the_members_readable():
    """The one difference, on purpose: bytes that are not UTF-8 where the sidecar never reads (a message's text)
    made `json` refuse the whole body; msgspec reads its three members anyway, without checking the whole body's
    UTF-8 (about as costly as reading it, for a conversation with any non-ASCII text), and LiteLLM answers such a body
    as it would."""
    raw = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"caf\xff"}]}'
    assert _reference(raw) is None
    assert request_facts(raw) == RequestFacts("m", True, False)


def test_msgspec_reads_the_usual_bodies():
    """The fast reader is the one in use (else the agent-sized body would be built whole again)."""
    assert request_body._DECODER is not None
    top = request_body._DECODER.decode(b'{"model":"m","stream":true}')
    assert (top.model, top.stream, len(top.stream_options)) == ("m", True, 0)


def test_nesting_too_deep_for_json_is_refused_as_before():
    """Both readers stop at the interpreter's limit; past it the request hook fails as it always did."""
    deep = b'{"model":"m","a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RecursionError):
        json.loads(deep)
    with pytest.raises(RecursionError):
        request_facts(deep)


_PIECES = [b'{', b'}', b'[', b']', b',', b':', b'"model"', b'"stream"', b'"stream_options"', b'"m"', b'true',
           b'false', b'null', b'1', b'-0.5e3', b'NaN', b' ', b'"\\u0065"', b'"\\ud800"', b'"\xc3\xa9"', b'\xff',
           b'"model":', b'"stream":true', b'"stream_options":{}', b'{"a":[1,{"model":"x"}]}']


@pytest.mark.parametrize("seed", range(6))
def test_random_bodies_read_as_json_reads_them(seed):
    """Property: near-JSON built from JSON's own pieces (most of it broken) reads the same both ways."""
    rng = random.Random(seed)
    for _ in range(1500):
        raw = b"".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 14)))
        if rng.random() < 0.5:
            members = [rng.choice([b'"model":"gpt"', b'"model":3', b'"stream":true', b'"stream":false',
                                   b'"stream_options":null', b'"x":' + raw, b'"model":"a","model":"b"'])
                       for _ in range(rng.randint(0, 4))]
            raw = b"{" + b",".join(members) + b"}"
        if b"\xff" in raw:  # not UTF-8: as json reads it, or (in a member never read) as if the byte were readable
            assert request_facts(raw) in (_reference(raw), _reference(raw.replace(b"\xff", b"?"))), raw
        else:
            assert request_facts(raw) == _reference(raw), raw
