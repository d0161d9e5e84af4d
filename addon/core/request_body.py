"""What the request path needs of a JSON request body: its top-level `model`, `stream` and `stream_options`.

Pure. An agent's request holds its whole conversation (100 KB and more, some turns in); building that tree
only to read three top-level members was the one part of the sidecar's cost that grows with the request.
msgspec's decoder reads the three members into a small struct and only checks the rest: with the `bench`
profile's 161 KB agent body the request hook takes ~140 µs instead of ~320. It is used only
where it reads exactly what `json.loads` reads; anything else (an array or scalar body, NaN, a BOM, lone
surrogates, msgspec missing) goes the old way, `usage.parse_json`. One difference, on purpose: bytes that are
not UTF-8 in a member the sidecar never reads (a message's text) no longer hide the body's three members. Checking
the whole body's UTF-8 to refuse them cost about as much as reading it (a 161 KB conversation with a few
accented words: 150–181 µs to read with the check, 74–104 without), and LiteLLM gives such a body the same answer
whatever the sidecar read of it.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from addon.core.usage import parse_json

try:
    import msgspec
except ImportError:  # pragma: no cover - a declared dependency; the full parse still works without it
    msgspec = None  # type: ignore[assignment]


class RequestFacts(NamedTuple):
    """The members of a JSON object body the sidecar reads before sending (a tuple: made on every request)."""

    model: str | None          # `model` when it is a string
    stream: bool               # `stream` is exactly true
    has_stream_options: bool   # a `stream_options` member is present (any value, null included)


def request_facts(raw: bytes | None) -> RequestFacts | None:
    """The body's facts; None when it is not a JSON object (no body, not JSON at all, an array, a string...).

    Equal to reading `json.loads(raw)` but for the difference the module states (tests/test_request_body.py holds
    the two side by side)."""
    if not raw:
        return None  # (what `json.loads` makes of no body: an error, or null for the bodyless request)
    if _DECODER is not None:
        try:
            top = _DECODER.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            pass  # not an object, or JSON msgspec reads differently from `json`: the full parse decides
        else:
            # (msgspec does not check the UTF-8 of strings it skips, `json` does: the one difference, above)
            model = top.model
            return RequestFacts(model if type(model) is str else None, top.stream is True,
                                len(top.stream_options) > 0)
    try:
        body = parse_json(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    model = body.get("model")
    return RequestFacts(model if isinstance(model, str) else None, body.get("stream") is True,
                        "stream_options" in body)


_DECODER: Any = None
if msgspec is not None:
    class _Top(msgspec.Struct):
        model: Any = None
        stream: Any = None
        stream_options: msgspec.Raw = msgspec.Raw(b"")  # absent: empty (a present member holds its bytes)

    _DECODER = msgspec.json.Decoder(_Top)
