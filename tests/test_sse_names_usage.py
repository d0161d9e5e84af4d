"""`_names_usage` (is this `"usage"` a key that may carry figures?) decides which stream chunks are parsed:
its one-regex form must answer exactly as the byte loop it replaced (copied here as the definition), for
any bytes after the key, where callers ask (`hi` is the end of the buffer or just past a line break)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.core.sse import _USAGE_WITH_VALUE, SSETap, _names_usage

_LF = 10


def _definition(buf: bytes, i: int, hi: int) -> bool:
    j = i + 7
    while j < hi and buf[j] in b" \t":
        j += 1
    c = buf[j] if j < hi else _LF
    if c == 58:
        j += 1
        while j < hi and buf[j] in b" \t":
            j += 1
        return buf[j:j + 4] != b"null"
    return c not in b",}]"


tails = st.lists(st.sampled_from([b" ", b"\t", b":", b"null", b"nul", b"n", b"{", b"}", b",", b"]", b"[", b"\n",
                                  b"\r", b"0", b'"', b"usage", b"x"]), max_size=8).map(b"".join)


@settings(max_examples=3000)
@given(st.binary(max_size=4), tails, st.data())
def test_answers_as_the_definition(head: bytes, tail: bytes, data: st.DataObject) -> None:
    buf = head + b'"usage"' + tail
    i = len(head)
    ends = [len(buf)] + [k + 1 for k in range(i + 7, len(buf)) if buf[k] in b"\r\n"]
    hi = data.draw(st.sampled_from(ends))
    assert _names_usage(buf, i, hi) is _definition(buf, i, hi)
    assert _names_usage(bytearray(buf), i, hi) is _definition(buf, i, hi)


@pytest.mark.parametrize("text, carries", [
    (b'"usage": null}', False), (b'"usage":null,', False), (b'"usage" :\tnull', False),
    (b'"usage": {"prompt_tokens": 1}', True), (b'"usage":{', True), (b'"usage": nul', True),
    (b'"usage",', False), (b'"usage"}', False), (b'"usage"]', False), (b'"usage"', True), (b'"usage"\n', True),
    (b'"usage": \n null', True),
])
def test_table(text: bytes, carries: bool) -> None:
    assert _names_usage(text, 0, len(text)) is carries


def test_null_usage_chunks_pass_untouched_and_the_real_one_is_metered() -> None:
    """What a user sees: an OpenAI-style stream saying `"usage": null` in each chunk is forwarded as is, and
    the usage chunk at its end is metered and cut out."""
    base = b'{"id":"c","model":"gpt-5-mini","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}'
    usage = (b'{"id":"c","model":"gpt-5-mini","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":2,'
             b'"total_tokens":12}}')
    tap = SSETap("chat", strip_usage_chunk=True)
    chunks = [b"data: " + base + b"\n\n"] * 3
    assert [tap(c) for c in chunks] == chunks
    assert tap(b"data: " + usage + b"\n\n") == []
    assert tap(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    tap(b"")
    assert tap.usage is not None and (tap.usage.tokens.input, tap.usage.tokens.output) == (10, 2)
    assert tap.stripped == 1


@settings(max_examples=2000)
@given(st.lists(st.tuples(st.binary(max_size=3), tails), min_size=1, max_size=4))
def test_one_search_finds_what_the_loop_over_keys_finds(parts: list[tuple[bytes, bytes]]) -> None:
    """`_USAGE_WITH_VALUE.search` stands for: some `"usage"` from here on may carry figures."""
    buf = b"".join(head + b'"usage"' + tail for head, tail in parts)
    n, i = len(buf), buf.find(b'"usage"')
    loop = False
    while i >= 0:
        if _definition(buf, i, n):
            loop = True
            break
        i = buf.find(b'"usage"', i + 7)
    assert (_USAGE_WITH_VALUE.search(buf, buf.find(b'"usage"'), n) is not None) is loop


@pytest.mark.parametrize("first, later, model", [
    (b'{"model":"first","choices":[]}', b'{"model":"later","choices":[],"usage":null}', "first"),
    (b'{"choices":[]}', b'{"model":"later","choices":[],"usage":null}', "later"),
    (b'{"choices":[]}', b'{"choices":[],"usage":null}', None),
])
def test_a_stream_keeps_the_first_model_whatever_null_chunks_say(first: bytes, later: bytes,
                                                                 model: str | None) -> None:
    usage = b'{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":2}}'
    tap = SSETap("chat", strip_usage_chunk=True)
    for body in (first, later, later, usage):
        tap(b"data: " + body + b"\n\n")
    tap(b"")
    assert tap.usage is not None and tap.usage.model == model
