"""Which upstream paths get a pool key, and which are the sidecar's own admin paths (pure).

Only LLM API routes and the info routes clients use are pooled (DESIGN §4). Everything else on the
upstream host — above all LiteLLM's management routes (`/key/*`, `/user/*`, `/team/*`,
`/customer/*`, `/spend/*`, `/model/new`, `/organization/*`…) — is answered by the sidecar with 403:
with some key roles a pool key reaches `/key/delete`, `/key/block` or `/key/regenerate`, and an
admin-only route answers 401 "Only proxy admin…", which must never be blamed on the key.

Decisions are made on the *normalized* path (percent-decoded until stable, dot segments resolved,
repeated slashes collapsed, lower case), so `//admin/openhands/keys`, `/v1/../admin/…` or
`/%61dmin/…` are recognised as what they resolve to. A pooled path must also be canonical as sent:
a client has no reason to send dot segments or encoded slashes to an LLM route, and forwarding them
would let the upstream (or a proxy in front) resolve them to a management route.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Literal
from urllib.parse import unquote

RouteKind = Literal["llm", "passthrough", "info", "admin", "management", "other"]

ADMIN_PREFIXES = ("/admin/openhands",)
ADMIN_EXACT = ("/openhands/spend-stats",)

# LiteLLM's openai_routes (reference §4), each with and without the /v1 prefix.
_LLM_EXACT = {
    "/chat/completions", "/completions", "/embeddings", "/moderations", "/utils/token_counter",
    "/messages", "/messages/count_tokens", "/rerank", "/v2/rerank", "/v1/rerank",
}
_LLM_PREFIXES = (
    "/responses", "/files", "/batches", "/assistants", "/threads", "/images", "/audio", "/realtime",
    "/vector_stores", "/fine_tuning", "/mcp",
)
_INFO_EXACT = {"/models", "/model/info", "/v1/models", "/v1/model/info"}
# Mapped pass-through prefixes: the body of an answer there can be the provider's own text.
_PASSTHROUGH_PREFIXES = ("/anthropic", "/gemini", "/vertex_ai", "/vertex-ai", "/bedrock", "/cohere", "/mistral",
                         "/azure", "/assemblyai", "/langfuse", "/openai")
_AZURE = re.compile(r"^/(?:openai/deployments|engines)/[^/]+/(?:chat/completions|completions|embeddings)$")
# LiteLLM management families (answered 403 by name, so the message can say why).
_MANAGEMENT_PREFIXES = (
    "/key", "/v2/key", "/user", "/v2/user", "/team", "/v2/team", "/customer", "/end_user", "/spend", "/global",
    "/model/", "/v1/model/", "/v2/model", "/model_group", "/organization", "/budget", "/credentials", "/sso",
    "/config", "/guardrails", "/tag", "/project", "/health", "/ui", "/login", "/logout", "/onboarding", "/invitation",
    "/cache", "/router", "/scim", "/jwt", "/audit", "/callbacks", "/active", "/settings", "/email", "/alerting",
    "/reload", "/provider", "/daily", "/get", "/queue", "/routes", "/debug", "/prompts", "/vector_store/",
)


def normalize_path(raw: str) -> str:
    """`raw` (no query) percent-decoded until stable, dot segments resolved, slashes collapsed, lower case."""
    return _normalize(raw.split("?", 1)[0])


@functools.lru_cache(maxsize=4096)
def _normalize(path: str) -> str:
    """Cached: clients call a handful of paths on every request (bounded, so odd paths only evict)."""
    path = path.split("#", 1)[0]
    for _ in range(5):  # %252e -> %2e -> .
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = path.replace("\\", "/")
    out: list[str] = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    return ("/" + "/".join(out)).lower()


def is_canonical(raw: str) -> bool:
    """True when the path as sent needs no normalization besides case (no %-escapes, dots, `//`)."""
    path = raw.split("?", 1)[0]
    if "%" in path or "\\" in path or "//" in path:
        return False
    segments = path.split("/")[1:]
    return not any(s in (".", "..") for s in segments) and path.startswith("/")


def is_admin_path(raw: str) -> bool:
    """Any path that normalizes to one of the sidecar's admin paths (answered locally, never forwarded)."""
    if not isinstance(raw, str):
        return False
    return _is_admin(normalize_path(raw))


@functools.lru_cache(maxsize=4096)
def _is_admin(p: str) -> bool:
    return any(p == a or p.startswith(a + "/") for a in ADMIN_PREFIXES) or any(
        p == a or p.startswith(a + "/") for a in ADMIN_EXACT)


@dataclass(frozen=True)
class ExtraRoutes:
    """Operator-listed extra routes to pool: exact paths, or prefixes written with a trailing `*`."""

    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str | Iterable[str]) -> "ExtraRoutes":
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        exact, prefixes = set(), []
        for item in items:
            item = item.strip()
            if not item:
                continue
            if not item.startswith("/"):
                raise ValueError(f"extra route {item!r} must start with '/'")
            if item.endswith("*"):
                prefixes.append(normalize_path(item[:-1]).rstrip("/") or "/")
            else:
                exact.add(normalize_path(item))
        return cls(frozenset(exact), tuple(prefixes))

    def match(self, path: str) -> bool:
        return path in self.exact or any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.prefixes)


NO_EXTRA = ExtraRoutes()


def _strip_v1(p: str) -> str:
    return p[3:] if p.startswith("/v1/") else p


def route_kind(raw: str, extra: ExtraRoutes = NO_EXTRA) -> RouteKind:
    """What the sidecar does with a request to the upstream host at this path (the query plays no part)."""
    if not isinstance(raw, str):
        return "other"
    if not extra.exact and not extra.prefixes:  # the usual case: no extra routes, a cache keyed by the path alone
        return _plain_route_kind(raw.split("?", 1)[0])
    return _route_kind(raw.split("?", 1)[0], extra)


@functools.lru_cache(maxsize=4096)
def _plain_route_kind(raw: str) -> RouteKind:
    """`_route_kind` with no extra routes (its own cache: hashing an `ExtraRoutes` per look-up is a Python call)."""
    return _route_kind_of(raw, NO_EXTRA)


@functools.lru_cache(maxsize=4096)
def _route_kind(raw: str, extra: ExtraRoutes) -> RouteKind:
    return _route_kind_of(raw, extra)


def _route_kind_of(raw: str, extra: ExtraRoutes) -> RouteKind:
    p = normalize_path(raw)
    if is_admin_path(raw):
        return "admin"
    if extra.match(p):
        return "llm" if is_canonical(raw) else "other"
    if not is_canonical(raw):
        return "other"
    if p in _INFO_EXACT:
        return "info"
    if _AZURE.match(p):
        return "llm"
    q = _strip_v1(p)
    if q in _LLM_EXACT or any(q == x or q.startswith(x + "/") for x in _LLM_PREFIXES):
        return "llm"
    if any(p == x or p.startswith(x + "/") for x in _PASSTHROUGH_PREFIXES):
        return "passthrough"
    if any(p.startswith(x) for x in _MANAGEMENT_PREFIXES):
        return "management"
    return "other"


def is_pooled(raw: str, extra: ExtraRoutes = NO_EXTRA) -> bool:
    return route_kind(raw, extra) in ("llm", "passthrough", "info")


def refusal_message(raw: str) -> str:
    """The 403 text for a path the sidecar does not pool."""
    path = normalize_path(raw)[:120]
    if not is_canonical(raw):
        return (f"This key-pool sidecar does not forward non-canonical paths (encoded characters, dot segments or "
                f"repeated slashes); resolved path: {path}")
    if route_kind(raw) == "management":
        return (f"{path} is a management route of the upstream LiteLLM proxy; this key-pool sidecar does not "
                "forward management routes with a pool key. Call the upstream directly with your own key, or "
                "list the route in openhands_extra_routes.")
    return (f"{path} is not an LLM API or model info route; this key-pool sidecar pools only those. "
            "List extra routes in openhands_extra_routes.")
