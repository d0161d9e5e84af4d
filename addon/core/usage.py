"""Token usage of one LLM response, normalised from the three wire formats the LiteLLM proxy speaks.

Pure: no I/O. The token semantics differ per format (DESIGN §6, reference §3), and getting them wrong
double-bills cache tokens, so every format is mapped onto `TokenCounts` here and nowhere else.
Upstream bodies are untrusted: junk never raises, it yields `None` or an ignored field.
"""
from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pricing.tokens import TokenCounts

try:
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - a declared dependency; the standard parser still works without it
    _fast_loads: Callable[[Any], Any] | None = None  # type: ignore[no-redef]

log = logging.getLogger(__name__)


def parse_json(body: bytes) -> Any:
    """`json.loads(body)`, several times faster on the request path (orjson) where the result is the same.

    orjson refuses what it does not read exactly as `json` does (NaN, 1e400, lone surrogates, UTF-16,
    a BOM, nesting past 1,024): those fall back to `json.loads`, errors included. It reads integers past
    64 bits as floats: callers that re-encode a body re-parse it with `json` first; token counts and
    costs that large are rejected either way.
    """
    if _fast_loads is not None:
        try:
            return _fast_loads(body)
        except ValueError:
            pass
    return json.loads(body)

WireFormat = Literal["chat", "messages", "responses"]

_PATHS: dict[str, WireFormat] = {
    "/chat/completions": "chat",
    "/v1/chat/completions": "chat",
    "/v1/messages": "messages",
    "/responses": "responses",
    "/v1/responses": "responses",
}


def wire_format_for_path(path: str) -> WireFormat | None:
    """The metered wire format of a request path; None for paths that carry no billable usage."""
    if not isinstance(path, str):
        return None
    return _wire_format(path)


@functools.lru_cache(maxsize=1024)
def _wire_format(path: str) -> WireFormat | None:
    """Cached: clients call a handful of paths (bounded, so odd paths only evict)."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    if len(path) > 1:
        path = path.rstrip("/")
    return _PATHS.get(path)


@dataclass(slots=True, unsafe_hash=True)
class Usage:
    """What one response consumed; `cost` is the upstream's own `usage.cost` when it sent one.

    A value object like `TokenCounts` (equality and hash leave `rejected` out). Never assign to a field:
    `with_model` builds the changed copy."""

    tokens: TokenCounts
    model: str | None
    cost: float | None
    # usage fields dropped as non-finite, negative or absurd (for one warning per key)
    rejected: tuple[str, ...] = field(default=(), compare=False)

    def with_model(self, model: str | None) -> Usage:
        return Usage(self.tokens, model, self.cost, self.rejected)


MAX_TOKENS = 10**9  # tokens in one response beyond this are not real (and 10**400 would overflow a float)
MAX_COST = 1000.0  # dollars for one response beyond this are not real


def _count(value: Any) -> int | None:
    """A token count, or None when the upstream sent something that is not one (bool, NaN, -1, "12")."""
    if type(value) is int:  # the usual case, first (bool is not `int` here)
        return value if 0 <= value <= MAX_TOKENS else None
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_TOKENS else None
    if isinstance(value, float) and math.isfinite(value) and 0 <= value <= MAX_TOKENS and value.is_integer():
        return int(value)
    return None


def _cost(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int like 10**400
        return None
    return value if math.isfinite(value) and 0 <= value <= MAX_COST else None


def _plain(usage: dict, depth: int = 0) -> bool:
    """Whether every field is one `_rejected` keeps without a look: an int count in range, None, a string,
    a finite cost in range, or a dict of such (the usual usage object; read without building anything)."""
    for name, value in usage.items():
        kind = type(value)
        if kind is int:
            if not 0 <= value <= MAX_TOKENS or name == "cost":
                return False
        elif kind is dict:
            if depth < 2 and value and not _plain(value, depth + 1):
                return False
        elif value is not None and kind is not str and not (
                name == "cost" and kind is float and 0 <= value <= MAX_COST):  # (NaN fails both comparisons)
            return False
    return True


def _rejected(usage: dict, depth: int = 0) -> tuple[str, ...]:
    """Names of numeric usage fields that metering had to drop (so the caller can warn once per key)."""
    if _plain(usage, depth):
        return ()
    out: list[str] = []
    for name, value in usage.items():
        if type(value) is int and name != "cost":  # the usual case, first
            if not 0 <= value <= MAX_TOKENS:
                out.append(str(name))
        elif isinstance(value, dict) and depth < 2:
            for sub in _rejected(value, depth + 1):
                out.append(f"{name}.{sub}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        elif name == "cost":
            if _cost(value) is None:
                out.append(name)
        elif isinstance(value, int):
            if not 0 <= value <= MAX_TOKENS:
                out.append(str(name))
        elif not (math.isfinite(value) and 0 <= value <= MAX_TOKENS):
            out.append(str(name))
    return tuple(out[:8]) if out else ()


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _model(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _first_max(*values: Any) -> int | None:
    """Alternative spellings of one count: the largest valid one (a `0` placeholder must not win)."""
    best: int | None = None
    for value in values:
        if value is not None:
            count = _count(value)
            if count is not None and (best is None or count > best):
                best = count
    return best


def _split_writes(total: int | None, details: dict) -> tuple[int, int]:
    """(5-minute writes, 1-hour writes): 1h writes are priced differently, so split them out.

    The reported total wins over the per-TTL details; the details alone count when it is missing.
    """
    if not details:
        return (0 if total is None else total), 0
    five = _count(details.get("ephemeral_5m_input_tokens")) or 0
    hour = _count(details.get("ephemeral_1h_input_tokens")) or 0
    if total is None:
        total = five + hour
    hour = min(hour, total)
    return total - hour, hour


def _chat(usage: dict) -> TokenCounts | None:
    get = usage.get
    prompt, completion = get("prompt_tokens"), get("completion_tokens")
    # the usual case inline: plain ints in range (`_count` reads everything else)
    if not (type(prompt) is int and 0 <= prompt <= MAX_TOKENS):
        prompt = _count(prompt)
    if not (type(completion) is int and 0 <= completion <= MAX_TOKENS):
        completion = _count(completion)
    if prompt is None and completion is None:
        return None
    ptd = get("prompt_tokens_details")
    if type(ptd) is not dict:
        ptd = _dict(ptd)
    # Kimi K2 puts `cached_tokens` at the top level; Anthropic via LiteLLM repeats reads in both places.
    top_reads, top_cached = get("cache_read_input_tokens"), get("cached_tokens")
    cached = ptd.get("cached_tokens")
    if top_reads is None and top_cached is None and type(cached) is int and 0 <= cached <= MAX_TOKENS:
        reads = cached  # OpenAI's one spelling (what `_first_max` makes of it)
    else:
        reads = _first_max(cached, top_reads, top_cached) or 0
    d1, d2 = ptd.get("cache_creation_token_details"), get("cache_creation_token_details")
    w1, w2 = get("cache_creation_input_tokens"), ptd.get("cache_creation_tokens")
    if d1 is None and d2 is None and w1 is None and w2 is None:
        write_5m = write_1h = 0  # no cache writes reported (what `_split_writes(None, {})` says)
    else:
        write_5m, write_1h = _split_writes(_first_max(w1, w2), _dict(d1) or _dict(d2))
    # prompt_tokens already contains reads and writes (LiteLLM adds them for Anthropic).
    uncached = max(0, (prompt or 0) - reads - write_5m - write_1h)
    ctd = get("completion_tokens_details")
    reasoning = (_count(ctd.get("reasoning_tokens")) or 0) if isinstance(ctd, dict) else 0
    return TokenCounts(uncached, write_5m, write_1h, reads, completion or 0, reasoning)


def _messages(usage: dict) -> TokenCounts | None:
    fields = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    if all(_count(usage.get(f)) is None for f in fields):
        return None
    # Anthropic's input_tokens excludes cache tokens: nothing to subtract.
    write_5m, write_1h = _split_writes(_count(usage.get("cache_creation_input_tokens")),
                                       _dict(usage.get("cache_creation")))
    return TokenCounts(_count(usage.get("input_tokens")) or 0, write_5m, write_1h,
                         _count(usage.get("cache_read_input_tokens")) or 0, _count(usage.get("output_tokens")) or 0, 0)


def _responses(usage: dict) -> TokenCounts | None:
    prompt = _count(usage.get("input_tokens"))
    completion = _count(usage.get("output_tokens"))
    if prompt is None and completion is None:
        return None
    itd = _dict(usage.get("input_tokens_details"))
    reads = _count(itd.get("cached_tokens")) or 0
    writes = _count(itd.get("cache_creation_tokens")) or 0  # newer LiteLLM, Anthropic bridged
    uncached = max(0, (prompt or 0) - reads - writes)
    reasoning = _count(_dict(usage.get("output_tokens_details")).get("reasoning_tokens")) or 0
    return TokenCounts(uncached, writes, 0, reads, completion or 0, reasoning)


_EXTRACT = {"chat": _chat, "messages": _messages, "responses": _responses}

# The usage fields of OpenAI's chat answers (and of Anthropic's through LiteLLM): `_chat_usual` reads them.
_CHAT_USUAL = frozenset(("prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
                         "completion_tokens_details", "cache_read_input_tokens", "cache_creation_input_tokens"))


def _chat_usual(usage: dict) -> TokenCounts | None:
    """`_chat(usage)` of the usual chat usage, in one pass, for a usage `_rejected` finds nothing in: only the
    fields of `_CHAT_USUAL`, each an int count in range or a dict of such (what `_chat` and `_plain` then
    read as they are). None: anything else, for the general path to read (the same result, only slower)."""
    if not _CHAT_USUAL.issuperset(usage):
        return None
    for value in usage.values():
        if type(value) is int:
            if not 0 <= value <= MAX_TOKENS:
                return None
        elif type(value) is dict:
            for count in value.values():
                if type(count) is not int or not 0 <= count <= MAX_TOKENS:
                    return None
        else:
            return None
    get = usage.get
    prompt, completion = get("prompt_tokens"), get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int:
        return None
    ptd = get("prompt_tokens_details")
    if ptd is None:
        reads = writes = 0
    elif type(ptd) is dict:
        reads, writes = ptd.get("cached_tokens", 0), ptd.get("cache_creation_tokens", 0)
    else:
        return None
    ctd = get("completion_tokens_details")
    return usual_chat_tokens(prompt, completion, reads, writes, get("cache_read_input_tokens") or 0,
                             get("cache_creation_input_tokens") or 0,
                             ctd.get("reasoning_tokens", 0) if type(ctd) is dict else 0)


def usual_chat_tokens(prompt: int, completion: int, reads: int, writes: int, top_reads: int, top_writes: int,
                      reasoning: int) -> TokenCounts:
    """The usual chat usage's buckets from its counts, all valid (absent ones 0): `prompt_tokens_details`' reads
    and writes, the top-level spellings of both (Anthropic via LiteLLM; `_first_max` of the spellings present is
    their largest), and `completion_tokens_details.reasoning_tokens`. `_chat_usual` and the typed reader of
    `response_body` both end here."""
    if top_reads > reads:
        reads = top_reads
    if top_writes > writes:
        writes = top_writes
    # prompt_tokens already contains reads and writes (LiteLLM adds them for Anthropic).
    uncached = prompt - reads - writes
    return TokenCounts(uncached if uncached > 0 else 0, writes, 0, reads, completion, reasoning)


def usage_from_json(fmt: WireFormat, body: Any) -> Usage | None:
    """Usage of a whole JSON response body (for responses: the response object itself)."""
    if fmt == "chat" and type(body) is dict:  # the usual chat usage first (the general path reads the rest)
        usage = body.get("usage")
        if type(usage) is dict:
            tokens = _chat_usual(usage)
            if tokens is not None:
                model = body.get("model")
                return Usage(tokens, model if type(model) is str and model else None, None, ())
    extract = _EXTRACT.get(fmt)  # type: ignore[arg-type]
    if extract is None or not isinstance(body, dict):
        return None
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return None
    try:
        tokens = extract(usage)
    except Exception:  # defensive: metering must never break a response
        log.debug("unreadable %s usage %r", fmt, usage, exc_info=True)
        return None
    if tokens is None:
        return None
    try:
        rejected = _rejected(usage)
    except Exception:  # noqa: BLE001 - a warning aid only
        rejected = ()
    model, cost = body.get("model"), usage.get("cost")
    return Usage(tokens, model if type(model) is str and model else None, None if cost is None else _cost(cost),
                 rejected)


def add_include_usage(request_body: Any) -> bool:
    """Ask for the usage chunk on a streamed chat request; True means the caller must strip it again.

    Without `stream_options.include_usage` a streamed chat response carries no usage at all, so the
    stream could not be metered.
    """
    if not isinstance(request_body, dict) or request_body.get("stream") is not True:
        return False
    options = request_body.get("stream_options")
    if options is None:
        request_body["stream_options"] = {"include_usage": True}
        return True
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return False
    options["include_usage"] = True
    return True
