"""Metering reads a buffered JSON answer's `model` and `usage` without building the reply: it must meter exactly
what reading the whole answer meters (`usage.parse_json`, then `usage_from_json`), whatever the upstream sent."""
from __future__ import annotations

import json
import random

import pytest

from addon.core import response_body
from addon.core.response_body import answer_usage
from addon.core.usage import parse_json, usage_from_json

CHAT_USAGE = {"prompt_tokens": 31500, "completion_tokens": 300, "total_tokens": 31800,
              "prompt_tokens_details": {"cached_tokens": 30000}}


def _reference(fmt, raw):
    """The whole answer read (orjson, else `json`), then its usage: what metering did before."""
    try:
        return usage_from_json(fmt, parse_json(raw))
    except (ValueError, UnicodeDecodeError):
        return None


CODE_EDIT = "def f(x):\n    return x  # caf\u00e9 \u2713\n" * 2000  # a 64 KB reply: an agent's file edit


ECHOED_USAGE = '"usage": {"prompt_tokens": 999999999, "completion_tokens": 999999999, "cost": 999.0}, "model": "x"'
ECHOED_USUAL_USAGE = '{"usage":{"prompt_tokens":999999999,"completion_tokens":999999999},"model":"x"}'


def _seen(usage):
    """Everything metering takes from a usage (equality leaves `rejected` out: it is compared too)."""
    return None if usage is None else (usage, usage.rejected)


def _answer(reply: str = "Hello.", **top) -> bytes:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-5-mini-2025-08-07",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
            "usage": CHAT_USAGE, **top}
    return json.dumps(body).encode()


# (wire format, answer, what metering reads: (input, cache_read, output, model) or None)
CASES = [
    ("chat", _answer(), (1500, 30000, 300, "gpt-5-mini-2025-08-07")),
    ("chat", _answer(CODE_EDIT), (1500, 30000, 300, "gpt-5-mini-2025-08-07")),
    ("chat", _answer(model=None), (1500, 30000, 300, None)),
    ("chat", _answer(model=7), (1500, 30000, 300, None)),
    ("chat", _answer(usage=None), None),
    ("chat", _answer(usage=[1, 2]), None),
    ("chat", _answer(usage="lots"), None),
    ("chat", b'{"usage":{"prompt_tokens":1,"completion_tokens":2},"usage":{"prompt_tokens":5,"completion_tokens":6}}',
     (5, 0, 6, None)),  # a repeated member: the last one, as json reads it
    ("chat", b'{"model":"a","model":"b","usage":{"prompt_tokens":1,"completion_tokens":1}}', (1, 0, 1, "b")),
    ("chat", b'{"mod\\u0065l":"esc","usage":{"prompt_tokens":1,"completion_tokens":1}}', (1, 0, 1, "esc")),
    ("chat", b'{"choices":[{"usage":{"prompt_tokens":9}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}',
     (1, 0, 1, None)),  # only the top-level usage
    # the reply echoes text the client chose (a prompt spelling a usage): only the upstream's own member counts
    ("chat", _answer(ECHOED_USAGE), (1500, 30000, 300, "gpt-5-mini-2025-08-07")),
    ("chat", _answer(ECHOED_USAGE, usage=None), None),
    ("chat", _answer(ECHOED_USUAL_USAGE), (1500, 30000, 300, "gpt-5-mini-2025-08-07")),  # the typed reading's shape
    ("chat", _answer(ECHOED_USUAL_USAGE, usage=None), None),
    ("chat", b'{"usage":{"prompt_tokens":18446744073709551616,"completion_tokens":2}}', (0, 0, 2, None)),  # 2**64
    ("chat", b'{"usage":{"prompt_tokens":100000000000000000000000000000,"completion_tokens":2,"cost":1e30}}',
     (0, 0, 2, None)),
    ("chat", b'{"usage":{"prompt_tokens":-100000000000000000000000000000,"completion_tokens":2}}', (0, 0, 2, None)),
    ("chat", b'{"usage":{"prompt_tokens":10,"completion_tokens":2,"cost":0.0042}}', (10, 0, 2, None)),
    ("chat", b'{"usage":{"prompt_tokens":10,"completion_tokens":2.0}}', (10, 0, 2, None)),
    ("chat", b'{"usage":{"prompt_tokens":true,"completion_tokens":2}}', (0, 0, 2, None)),
    ("messages", b'{"model":"claude-sonnet-4-5","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":12,'
                 b'"output_tokens":3,"cache_read_input_tokens":100,"cache_creation_input_tokens":5}}',
     (12, 100, 3, "claude-sonnet-4-5")),
    ("responses", b'{"model":"gpt-5","output":[{"type":"message"}],"usage":{"input_tokens":40,"output_tokens":4,'
                  b'"input_tokens_details":{"cached_tokens":30}}}', (10, 30, 4, "gpt-5")),
    # read by the full parse, refused by msgspec: the full parse answers
    ("chat", b'{"model":"\\ud800","usage":{"prompt_tokens":1,"completion_tokens":1}}', (1, 0, 1, "\ud800")),
    ("chat", b'{"x":"\\udc00","usage":{"prompt_tokens":1,"completion_tokens":1}}', (1, 0, 1, None)),
    ("chat", b'{"usage":{"prompt_tokens":NaN,"completion_tokens":1}}', (0, 0, 1, None)),
    ("chat", b'{"usage":{"prompt_tokens":1,"completion_tokens":1,"cost":1e400}}', (1, 0, 1, None)),
    ("chat", b'\xef\xbb\xbf{"usage":{"prompt_tokens":1,"completion_tokens":1}}', (1, 0, 1, None)),
    ("chat", '{"usage":{"prompt_tokens":1,"completion_tokens":1}}'.encode("utf-16"), (1, 0, 1, None)),
    ("chat", b'{"s":"\xed\xa0\x80","usage":{"prompt_tokens":1,"completion_tokens":1}}', (1, 0, 1, None)),
    # refused by the full parse: nothing metered from the body
    ("chat", b'{"model":"\xff","usage":{"prompt_tokens":1,"completion_tokens":1}}', None),  # not UTF-8 in a member read
    ("chat", b'{"usage":{"prompt_tokens":1,"completion_tokens":1,"n\xff":2}}', None),
    ("chat", b'{"usage":{"prompt_tokens":1,"completion_tokens":1},}', None),
    ("chat", b'{"usage":{"prompt_tokens":1,"completion_tokens":1}} trailing', None),
    ("chat", b'{"usage":{"prompt_tokens":1,"completion_tokens":1}', None),
    ("chat", b'[{"usage":{"prompt_tokens":1,"completion_tokens":1}}]', None),
    ("chat", b'"usage"', None),
    ("chat", b'null', None),
    ("chat", b'', None),
]


CASES_BY_FORMAT = {fmt: raw for fmt, raw, _ in CASES if fmt != "chat"}


def _read(usage):
    if usage is None:
        return None
    t = usage.tokens
    return (t.input, t.cache_read, t.output, usage.model)


@pytest.mark.parametrize("fmt, raw, expected", CASES)
def test_an_answer_meters_what_reading_it_whole_meters(fmt, raw, expected):
    assert _read(_reference(fmt, raw)) == expected, "the table itself must say what the full parse meters"
    assert _seen(answer_usage(fmt, raw)) == _seen(_reference(fmt, raw))


@pytest.mark.parametrize("fmt, raw, expected", CASES)
def test_without_msgspec_the_full_parse_answers_the_same(fmt, raw, expected, monkeypatch):
    monkeypatch.setattr(response_body, "_DECODER", None)
    assert _read(answer_usage(fmt, raw)) == expected


def test_msgspec_reads_the_usual_answers(monkeypatch):
    """The fast readers are the ones in use: no answer here is built whole (its reply would be), and the usual chat
    usage is read typed, without the general reading of a usage object."""
    def refused(*_args):
        raise AssertionError("the slow path read it")
    monkeypatch.setattr(response_body, "parse_json", refused)
    general = response_body.usage_from_json
    monkeypatch.setattr(response_body, "usage_from_json", refused)
    assert _read(answer_usage("chat", _answer(CODE_EDIT))) == (1500, 30000, 300, "gpt-5-mini-2025-08-07")
    anthropic_via_litellm = {**CHAT_USAGE, "cache_read_input_tokens": 30000, "cache_creation_input_tokens": 500,
                             "completion_tokens_details": {"reasoning_tokens": 120, "text_tokens": 180}}
    assert _seen(answer_usage("chat", _answer(usage=anthropic_via_litellm))) == _seen(
        general("chat", {"model": "gpt-5-mini-2025-08-07", "usage": anthropic_via_litellm}))
    monkeypatch.setattr(response_body, "usage_from_json", general)  # other usages: read as JSON, not the answer
    assert _read(answer_usage("chat", _answer(usage={**CHAT_USAGE, "cost": 0.01}))) == (
        1500, 30000, 300, "gpt-5-mini-2025-08-07")
    assert _read(answer_usage("messages", CASES_BY_FORMAT["messages"])) == (12, 100, 3, "claude-sonnet-4-5")


def test_a_broken_byte_in_the_reply_no_longer_hides_the_answers_usage():
    """The one difference, on purpose: bytes that are not UTF-8 where metering never reads (the reply's text) made
    the whole answer unreadable, so the upstream's charge for it went unmetered; its usage is metered now."""
    raw = _answer().replace(b'"Hello."', b'"Hel\xfflo."')
    assert _reference("chat", raw) is None
    assert _read(answer_usage("chat", raw)) == (1500, 30000, 300, "gpt-5-mini-2025-08-07")


def test_nesting_reads_as_the_full_parse_reads_it():
    """Deep nesting in a member metering skips: within the interpreter's limit both readers meter the usage next
    to it (orjson stops at 1,024 levels, and `json` reads on); past it both fail the hook, as it always did."""
    deep = b'{"choices":' + b"[" * 5000 + b"]" * 5000 + b',"usage":{"prompt_tokens":7,"completion_tokens":1}}'
    assert _read(_reference("chat", deep)) == _read(answer_usage("chat", deep)) == (7, 0, 1, None)
    deeper = b'{"choices":' + b"[" * 20_000 + b"]" * 20_000 + b',"usage":{"prompt_tokens":7,"completion_tokens":1}}'
    with pytest.raises(RecursionError):
        _reference("chat", deeper)
    with pytest.raises(RecursionError):
        answer_usage("chat", deeper)


_PIECES = [b'{', b'}', b'[', b']', b',', b':', b'"usage"', b'"model"', b'"prompt_tokens"', b'"completion_tokens"',
           b'"m"', b'true', b'null', b'1', b'7', b'-0.5e3', b'1e400', b'NaN', b'18446744073709551616', b' ',
           b'"\\u0065"', b'"\\ud800"', b'"\xc3\xa9"', b'\xff', b'"usage":',
           b'{"prompt_tokens":3,"completion_tokens":4}']
_MEMBERS = [b'"model":"gpt"', b'"model":3', b'"usage":{"prompt_tokens":3,"completion_tokens":4}',
            b'"usage":{"input_tokens":3,"output_tokens":4,"cache_read_input_tokens":2}', b'"usage":null',
            b'"usage":{"prompt_tokens":99999999999999999999999,"completion_tokens":1,"cost":0.5}',
            b'"usage":{"prompt_tokens":5,"completion_tokens":-1,"cost":"x"}', b'"model":"a","model":"b"',
            b'"choices":[{"message":{"content":"\xe2\x82\xac\\n"}}]']


@pytest.mark.parametrize("seed", range(6))
def test_random_answers_meter_as_reading_them_whole_does(seed):
    """Property: near-JSON built from JSON's own pieces (most of it broken), in every wire format."""
    rng = random.Random(seed)
    for _ in range(1500):
        fmt = rng.choice(["chat", "messages", "responses"])
        raw = b"".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 14)))
        if rng.random() < 0.6:
            members = [rng.choice(_MEMBERS + [b'"x":' + raw]) for _ in range(rng.randint(0, 4))]
            raw = b"{" + b",".join(members) + b"}"
        try:
            expected = _seen(_reference(fmt, raw))
        except RecursionError:
            continue
        got = _seen(answer_usage(fmt, raw))
        if b"\xff" in raw:  # not UTF-8: as before, or (in a member metering skips) as if the byte were readable
            assert got in (expected, _seen(_reference(fmt, raw.replace(b"\xff", b"?")))), raw
        else:
            assert got == expected, raw


_USUAL_NAMES = ['"prompt_tokens"', '"completion_tokens"', '"total_tokens"', '"prompt_tokens_details"',
                '"completion_tokens_details"', '"cache_read_input_tokens"', '"cache_creation_input_tokens"',
                '"prompt_\\u0074okens"', '"cost"', '"server_tool_use"']
_COUNTS = ["0", "7", "31500", "1000000000", "1000000001", "-1", "1.0", "2.5", "true", "false", "null", '"12"',
           "18446744073709551616", "1e400", "[1]"]
_DETAILS = ["{}", '{"cached_tokens":30000}', '{"cached_tokens":-1}', '{"cached_tokens":1.0}',
            '{"cached_tokens":null}', '{"cache_creation_tokens":300,"cached_tokens":5}', '{"reasoning_tokens":90}',
            '{"reasoning_tokens":90,"audio_tokens":0,"text_tokens":true}', '{"cached_tokens":1000000001}']


@pytest.mark.parametrize("seed", range(4))
def test_random_chat_usages_meter_as_reading_them_whole_does(seed):
    """Property: usages near the usual chat one (its fields, repeated, misspelt, with every kind of count), read
    typed or generally, meter exactly what reading the whole answer meters."""
    rng = random.Random(seed)
    for _ in range(2500):
        members = []
        for _ in range(rng.randint(0, 8)):
            name = rng.choice(_USUAL_NAMES[:7]) if rng.random() < 0.85 else rng.choice(_USUAL_NAMES)
            value = rng.choice(_DETAILS) if "details" in name and rng.random() < 0.8 else rng.choice(_COUNTS)
            members.append(f"{name}:{value}")
        if rng.random() < 0.5:  # the usual two counts, valid: the typed reading is taken as often as not
            members[:0] = [f'"prompt_tokens":{rng.randint(0, 40000)}', f'"completion_tokens":{rng.randint(0, 900)}']
            rng.shuffle(members)
        raw = ('{"model":"gpt-5","choices":[],"usage":{' + " , ".join(members) + "}}").encode()
        expected = _seen(_reference("chat", raw))
        assert _seen(answer_usage("chat", raw)) == expected, raw
