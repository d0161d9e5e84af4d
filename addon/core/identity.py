"""Who a client is, and credential hygiene on pooled flows (pure: headers in, headers out).

Identity is the conversation (`x-litellm-session-id`) when the client names one, so one conversation
keeps one key and its provider prompt cache; otherwise a hash of the client's own credential.

Hygiene (reference/litellm-errors.md §5): LiteLLM takes the first credential present among
`x-litellm-api-key`, `Authorization`, `API-Key`, `x-api-key`, `x-goog-api-key`,
`Ocp-Apim-Subscription-Key` and `?key=` (and reads `litellm_user_api_key` on pass-through routes).
Any of them left in place either reaches the upstream (the client's secret leaks) or wins over the
pool key (LiteLLM's "unknown key" answer is then blamed on the pool key). So every carrier, plus
`cookie` and `proxy-authorization`, is removed and exactly one credential — the pool key — is set,
in the header the client used (else `x-litellm-api-key`).

The request path works on mitmproxy's raw header fields (`(name, value)` byte tuples): one walk reads
everything identity, the allowlist and the swap need (`scan_headers`), one more writes the swapped
fields (`swapped_fields`), and one redacts them when the exchange is over (`redacted_fields`). Names
compare as mitmproxy compares them (ASCII lower case of the bytes); a repeated header reads as its
values joined with ", ", as `Headers.get` folds them. The `Headers`-taking functions below are the
same rules for callers that hold a `Headers` object.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol

from addon.core.masking import mask_key

SESSION_HEADER = "x-litellm-session-id"
# Every header LiteLLM (or a pass-through route) reads as a credential, in LiteLLM's order.
CREDENTIAL_HEADERS = ("x-litellm-api-key", "authorization", "api-key", "x-api-key", "x-goog-api-key",
                      "ocp-apim-subscription-key", "litellm_user_api_key", "litellm-user-api-key")
# Removed too: not a LiteLLM credential, but a client secret all the same.
SECRET_HEADERS = ("cookie", "proxy-authorization")
# Where the pool key may be put: the client's header when it used one of these, else x-litellm-api-key.
SETTABLE = ("x-litellm-api-key", "authorization", "api-key", "x-api-key", "x-goog-api-key",
            "ocp-apim-subscription-key")
CREDENTIAL_QUERY = ("key", "api_key", "api-key")

Fields = tuple[tuple[bytes, bytes], ...]

_SESSION_B = SESSION_HEADER.encode()
_CREDENTIAL_PAIRS = tuple((n, n.encode()) for n in CREDENTIAL_HEADERS)
_CREDENTIAL_SET = frozenset(b for _, b in _CREDENTIAL_PAIRS)
_CREDENTIAL_NAME = {b: n for n, b in _CREDENTIAL_PAIRS}
_SETTABLE_B = frozenset(n.encode() for n in SETTABLE)
_SETTABLE_OF = {n: n.encode() for n in SETTABLE}
_CARRIERS_B = frozenset(b for _, b in _CREDENTIAL_PAIRS) | frozenset(n.encode() for n in SECRET_HEADERS)
_DEFAULT_TARGET = b"x-litellm-api-key"

# A header name as sent -> its lower case. Clients and the upstream send the same few names on every
# request: a dict look-up (an opcode, no call, nothing allocated) instead of `bytes.lower` per header.
# Bounded: past the cap, odd names are lowered each time.
LOWER_NAMES: dict[bytes, bytes] = {}
_LOWER_CAP = 4096


def lower_name(name: bytes) -> bytes:
    """`name.lower()`, remembered in `LOWER_NAMES` (callers look there first: `LOWER_NAMES[name]`)."""
    low = name.lower()
    if len(LOWER_NAMES) < _LOWER_CAP and type(name) is bytes:
        LOWER_NAMES[name] = low
    return low


class HasFields(Protocol):
    """mitmproxy's `Headers`: its raw fields, read and replaced whole."""

    fields: Fields


def _native(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")  # how mitmproxy's Headers decode


def fold(fields: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Lower-case name -> value, repeated headers joined with ", " (`Headers.get`'s folding), in one walk."""
    out: dict[bytes, bytes] = {}
    for name, value in fields:
        try:
            name = LOWER_NAMES[name]
        except KeyError:
            name = lower_name(name)
        out[name] = out[name] + b", " + value if name in out else value
    return out


def strip_bearer(value: str) -> str:
    value = value.strip()
    return value[7:].strip() if value[:7].lower() == "bearer " else value


def _credential_value(name: str, value: str) -> str | None:
    """The credential a non-blank header value carries (LiteLLM's reading of each header)."""
    if name == "authorization":
        stripped = value.strip()
        if stripped[:7].lower() == "bearer " and stripped[7:].strip():
            return stripped[7:].strip()
        if stripped[:6].lower() == "basic ":
            return stripped[6:].strip() or None
        return stripped
    return strip_bearer(value)


@dataclass(slots=True)
class HeaderScan:
    """What one walk over a request's headers tells: the session, the credential, the carriers sent."""

    folded: Mapping[bytes, bytes]
    session: str                   # x-litellm-session-id, stripped ("" when absent)
    credential: str | None         # the client's key from its headers, in LiteLLM's order
    used: tuple[str, ...]          # credential header names present, in LiteLLM's order

    def credential_with(self, query: list[tuple[str, str]] | None) -> str | None:
        """The header credential, else `?key=` (LiteLLM's order of precedence)."""
        if self.credential is not None:
            return self.credential or None  # "" : the headers decided, and carry no usable key
        for k, v in query or ():
            if k.lower() in CREDENTIAL_QUERY and v:
                return v
        return None

    def identity(self, peer: str | None, query: list[tuple[str, str]] | None = None) -> str:
        if self.session:
            return "session:" + self.session[:200]
        return identity_of(self.credential_with(query), peer)


def scan_headers(fields: Iterable[tuple[bytes, bytes]]) -> HeaderScan:
    folded: dict[bytes, bytes] = {}
    first: bytes | None = None  # the first credential header name met, and whether another one came
    several = False
    for name, value in fields:  # `fold`, inlined: the one walk of the request path
        try:
            name = LOWER_NAMES[name]
        except KeyError:
            name = lower_name(name)
        if name in folded:
            folded[name] = folded[name] + b", " + value
        else:
            folded[name] = value
            if name in _CREDENTIAL_SET:  # (noted here: a set built from the names afterwards costs more)
                if first is None:
                    first = name
                else:
                    several = True
    session_raw = folded.get(_SESSION_B)
    session = _native(session_raw).strip() if session_raw else ""
    if first is None:
        return HeaderScan(folded, session, None, ())
    if not several:  # the usual case: one credential header, no order to settle
        header = _CREDENTIAL_NAME[first]
        return HeaderScan(folded, session, _header_credential(header, folded[first]), (header,))
    credential: str | None = None
    used: list[str] = []
    for header, header_b in _CREDENTIAL_PAIRS:
        raw = folded.get(header_b)
        if raw is None:
            continue
        used.append(header)
        if credential is None:
            credential = _header_credential(header, raw)
    return HeaderScan(folded, session, credential, tuple(used))


def _header_credential(name: str, raw: bytes) -> str | None:
    """The credential one header carries: None for a blank value (the search goes on), "" for a
    "Basic " with nothing after it (the search stops there, with no usable key). (`str.strip` strips
    all that `bytes.strip` does and more: one blank test on the decoded value says both.)"""
    value = raw.decode("utf-8", "surrogateescape")
    if not value.strip():
        return None
    credential = _credential_value(name, value)
    return "" if credential is None else credential


def identity_of(credential: str | None, peer: str | None) -> str:
    if credential:
        return "cred:" + hashlib.sha256(credential.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return "anon:" + (peer or "unknown")


def client_credential(headers: HasFields, query: list[tuple[str, str]] | None = None) -> str | None:
    """The client's own key, in LiteLLM's order of precedence (headers, then `?key=`)."""
    return scan_headers(headers.fields).credential_with(query)


def client_identity(headers: HasFields, peer: str | None = None, query: list[tuple[str, str]] | None = None) -> str:
    return scan_headers(headers.fields).identity(peer, query)


def swapped_fields(fields: Fields, pool_key: str, used: Iterable[str] | None = None,
                   also: Mapping[bytes, bytes] | None = None) -> Fields:
    """`fields` with every credential carrier and the client's cookies removed and exactly one credential
    set, the pool key, in the client's own header (`used`: the names `scan_headers` found); `also` are
    further headers set the way `Headers[name] = value` sets them (the first one replaced, any repeats
    dropped, else appended), written in the same walk."""
    return swap_and_redact(fields, pool_key, used, also)[0]


def swap_and_redact(fields: Fields, pool_key: str, used: Iterable[str] | None = None,
                    also: Mapping[bytes, bytes] | None = None) -> tuple[Fields, Fields]:
    """`swapped_fields`, and what `redacted_fields` makes of them (the one credential masked), from one walk:
    the request path writes the first before the flow goes out and the second once it is over."""
    if used is None:
        used = scan_headers(fields).used
    target = _DEFAULT_TARGET
    for n in used:
        if n in _SETTABLE_OF:
            target = _SETTABLE_OF[n]
            break
    also = also or {}
    out: list[tuple[bytes, bytes]] = []
    done: set[bytes] = set()
    for field in fields:
        try:
            name = LOWER_NAMES[field[0]]
        except KeyError:
            name = lower_name(field[0])
        if name in _CARRIERS_B:
            continue
        if name in also:
            if name not in done:
                done.add(name)
                out.append((field[0], also[name]))
            continue
        out.append(field)
    at = len(out)
    value, masked = _pool_credential(target, pool_key)
    out.append((target, value))
    if len(done) < len(also):
        for name, value in also.items():
            if name not in done and name not in _CARRIERS_B:
                out.append((name, value))
    swapped = tuple(out)
    out[at] = (target, masked)
    return swapped, tuple(out)


@functools.lru_cache(maxsize=1024)
def _pool_credential(target: bytes, pool_key: str) -> tuple[bytes, bytes]:
    """The header value that carries a pool key, and its masked form (a pool's keys: bounded, cached)."""
    key = pool_key.encode("utf-8", "surrogateescape")
    value = b"Bearer " + key if target == b"authorization" else key
    return value, _masked(target, value)


def swap_credential(headers: HasFields, pool_key: str) -> list[str]:
    """Remove every credential carrier and the client's cookies; set exactly one credential, the pool key.

    Returns the names of the credential headers the client had sent (for the flow's metadata).
    """
    used = scan_headers(headers.fields).used
    headers.fields = swapped_fields(headers.fields, pool_key, used)
    return list(used)


def _masked(name: bytes, value: bytes) -> bytes:
    if name == b"cookie":
        return b"<removed>"
    stripped = _native(value).strip()
    scheme = ""
    for prefix in ("bearer ", "basic "):
        if stripped[:len(prefix)].lower() == prefix:
            scheme, stripped = stripped[:len(prefix)], stripped[len(prefix):].strip()
    text = f"{scheme}{mask_key(stripped)}" if stripped else scheme.strip()
    return text.encode("utf-8", "surrogateescape")


def redacted_fields(fields: Fields) -> Fields | None:
    """`fields` with every credential header masked (`first8...last4`, a repeated one folded into one
    masked value) and cookies replaced; None when there is nothing to redact (nothing to write)."""
    found: dict[bytes, bytes] = {}
    for name, value in fields:
        name = name.lower()
        if name in _CARRIERS_B:
            prev = found.get(name)
            found[name] = value if prev is None else prev + b", " + value
    if not found:
        return None
    out: list[tuple[bytes, bytes]] = []
    done: set[bytes] = set()
    for field in fields:
        name = field[0].lower()
        if name not in found:
            out.append(field)
        elif name not in done:  # repeats are folded into the first, as `Headers[name] = value` does
            done.add(name)
            out.append((field[0], _masked(name, found[name])))
    return tuple(out)


def redact_credentials(headers: HasFields) -> None:
    """After the exchange: credential headers masked (`first8...last4`), so mitmdump's header printing
    (`flow_detail` >= 2), mitmweb and saved flows (`-w`) never show a pool key or admin token in full."""
    new = redacted_fields(headers.fields)
    if new is not None:
        headers.fields = new


def credential_allowed(credential: str | None, allowlist: frozenset[str]) -> bool:
    """With an allowlist configured, only listed client keys may spend the pool."""
    if not allowlist:
        return True
    if credential is None:
        return False
    return any(hmac.compare_digest(credential.encode("utf-8", "surrogateescape"), allowed.encode())
               for allowed in allowlist)


def access(credential: str | None, allowlist: frozenset[str], peer: str | None,
           open_pool: bool) -> tuple[int, str] | None:
    """The secure default (DESIGN §4): None when the client may use the pool, else (status, message).

    With an allowlist, a listed credential is required; with none, only loopback clients are served
    unless the operator opened the pool explicitly.
    """
    if allowlist:
        if credential_allowed(credential, allowlist):
            return None
        return 401, "This sidecar does not accept your client key."
    if open_pool or is_loopback(peer):
        return None
    return 403, ("This key-pool sidecar serves loopback clients only: no client allowlist is configured. Set "
                 "OPENHANDS_CLIENT_KEYS (or openhands_client_keys_file) to admit remote clients by key, or "
                 "openhands_open_pool=true to serve any client.")


def pool_access(headers: HasFields, allowlist: frozenset[str], peer: str | None, open_pool: bool,
                query: list[tuple[str, str]] | None = None) -> tuple[int, str] | None:
    return access(client_credential(headers, query) if allowlist else None, allowlist, peer, open_pool)


@functools.lru_cache(maxsize=1024)
def is_loopback(peer: str | None) -> bool:
    """The one loopback rule (pool default, admin API, metrics): IPv4-mapped IPv6 and zone ids included.
    Cached: a handful of peers ask it on every request (bounded, so many peers only evict)."""
    if not peer:
        return False
    try:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback
