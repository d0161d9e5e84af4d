"""What metering needs of a buffered JSON answer: its top-level `model` and `usage`.

Pure. An answer's `choices` (or `content`, or `output`) hold the model's whole reply, tens of KB for a code edit;
building them only to read two top-level members was the part of the response hook that grows with the answer.
msgspec's decoder reads the two members into a small struct and only checks the rest: ~2× faster than building
the answer with orjson (22 KB: ~22 µs against ~41). It is used only where it reads what `usage.parse_json` reads;
anything else (an array or scalar answer, NaN, 1e400, a BOM, lone surrogates, msgspec missing) goes the old way,
and both stop at the interpreter's nesting limit, where the hook fails as it always did. One difference, on
purpose: bytes that are not UTF-8 in a member metering never reads (the reply's text) no longer make the whole
answer unreadable; its usage is metered, as the upstream charged it (before, such an answer was charged nothing).
"""
from __future__ import annotations

from typing import Any

from addon.core.usage import Usage, WireFormat, parse_json, usage_from_json

try:
    import msgspec
except ImportError:  # pragma: no cover - a declared dependency; the full parse still works without it
    msgspec = None  # type: ignore[assignment]


def answer_usage(fmt: WireFormat, raw: bytes) -> Usage | None:
    """`usage_from_json(fmt, parse_json(raw))`, None where that parse fails (but for the difference the module
    states); the rest of the answer is not built (tests/test_response_body.py holds the two side by side)."""
    if _DECODER is not None and raw:
        try:
            top = _DECODER.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            pass  # not an object, or JSON msgspec reads differently from orjson and `json`: the full parse decides
        else:
            # (msgspec does not check the UTF-8 of strings it skips: a broken byte in the reply leaves its usage)
            return usage_from_json(fmt, {"model": top.model, "usage": top.usage})
    try:
        return usage_from_json(fmt, parse_json(raw))
    except (ValueError, UnicodeDecodeError):
        return None


_DECODER: Any = None
if msgspec is not None:
    class _Answer(msgspec.Struct):
        model: Any = None
        usage: Any = None  # (absent and null read alike: `usage_from_json` takes neither for a usage)

    _DECODER = msgspec.json.Decoder(_Answer)
