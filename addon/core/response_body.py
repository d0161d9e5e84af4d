"""What metering needs of a buffered JSON answer: its top-level `model` and `usage`.

Pure. An answer's `choices` (or `content`, or `output`) hold the model's whole reply, tens of KB for a code edit;
building them only to read two top-level members was the part of the response hook that grows with the answer.
msgspec's decoder reads the two members into a small struct and only checks the rest: ~2× faster than building
the answer with orjson (22 KB: ~22 µs against ~41). It is used only where it reads what `usage.parse_json` reads;
anything else (an array or scalar answer, NaN, 1e400, a BOM, lone surrogates, msgspec missing) goes the old way,
and both stop at the interpreter's nesting limit, where the hook fails as it always did. One difference, on
purpose: bytes that are not UTF-8 in a member metering never reads (the reply's text) no longer make the whole
answer unreadable; its usage is metered, as the upstream charged it (before, such an answer was charged nothing).

The usual chat usage (the fields `usage._chat_usual` reads, every count an int in range) is read typed: msgspec
checks the counts as it decodes them, and the buckets come from `usage.usual_chat_tokens`, as `_chat_usual`'s do;
any other usage is decoded as JSON and read by `usage_from_json`.
"""
from __future__ import annotations

from typing import Annotated, Any

from addon.core.usage import MAX_TOKENS, Usage, WireFormat, parse_json, usage_from_json, usual_chat_tokens

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
            raw_usage, model = top.usage, top.model
            if not raw_usage:  # absent (an empty Raw): `usage_from_json` finds no usage, as for null
                return None
            if fmt == "chat":
                try:
                    u = _USUAL_CHAT.decode(raw_usage)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    pass  # another usage (a cost, a null, a float count, a field more): the general reading
                else:
                    ptd, ctd = u.prompt_tokens_details, u.completion_tokens_details
                    tokens = usual_chat_tokens(u.prompt_tokens, u.completion_tokens, ptd.get("cached_tokens", 0),
                                               ptd.get("cache_creation_tokens", 0), u.cache_read_input_tokens,
                                               u.cache_creation_input_tokens, ctd.get("reasoning_tokens", 0))
                    return Usage(tokens, model if type(model) is str and model else None, None, ())
            try:
                usage = _ANY.decode(raw_usage)
            except (msgspec.DecodeError, RecursionError):
                pass  # (as the whole answer's decode would have: the full parse decides)
            else:
                return usage_from_json(fmt, {"model": model, "usage": usage})
    try:
        return usage_from_json(fmt, parse_json(raw))
    except (ValueError, UnicodeDecodeError):
        return None


_DECODER: Any = None
if msgspec is not None:
    class _Answer(msgspec.Struct):
        model: Any = None
        usage: msgspec.Raw = msgspec.Raw()  # (the member's own bytes, read below: typed when it is the usual one)

    _Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]

    class _UsualChatUsage(msgspec.Struct, forbid_unknown_fields=True):
        """What `usage._chat_usual` reads, as it reads it: these fields only, every count an int in range (not a
        bool, a float or null), the details objects of such counts; an absent top-level spelling reads as 0."""
        prompt_tokens: _Count
        completion_tokens: _Count
        total_tokens: _Count = 0
        prompt_tokens_details: dict[str, _Count] = msgspec.field(default_factory=dict)
        completion_tokens_details: dict[str, _Count] = msgspec.field(default_factory=dict)
        cache_read_input_tokens: _Count = 0
        cache_creation_input_tokens: _Count = 0

    _DECODER = msgspec.json.Decoder(_Answer)
    _USUAL_CHAT = msgspec.json.Decoder(_UsualChatUsage)
    _ANY = msgspec.json.Decoder()
