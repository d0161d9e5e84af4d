"""Admin API answered by the addon itself (never forwarded upstream).

Routing and input validation are pure (`route`, `validate_*`); handlers are blocking and run off the
event loop. Bad input gets a 4xx with a JSON error that says what is wrong, and changes nothing.
"""
from __future__ import annotations

import hmac
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qs


from addon.core.masking import mask_key
from addon.core.routes import is_admin_path as _is_admin_path
from addon.pool.pool import Pool, iso
from addon.store.mongo import DatabaseError
from addon.core.rotation_policy import rotation_point
from addon.core.status import Status
from addon.core.identity import is_loopback

ADMIN_PREFIX = "/admin/openhands"
STATS_PATH = "/openhands/spend-stats"
MAX_BODY = 64 * 1024
MAX_DEPTH = 32  # JSON nesting the API accepts; deeper bodies are refused before parsing (no RecursionError)
MAX_INT_DIGITS = 30  # an integer with more digits is no budget, limit or spend (and 10**400 overflows a float)
MAX_PATH = 2048
DASHBOARD_HISTORY = 2000  # history rows behind the dashboard's chart and burn rate
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}\Z")  # \Z: "$" would let a trailing newline in


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def is_admin_path(path: str) -> bool:
    """Any path that normalizes (percent-decoding, dot segments, repeated slashes, case) to an admin path:
    answered locally, never forwarded (`route` then refuses the non-canonical forms with 400)."""
    return _is_admin_path(path)


@dataclass(frozen=True)
class Route:
    name: str
    key_id: str | None = None


# (method, pattern) -> route name; `{id}` is one validated path segment.
ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/admin/openhands/keys", "list_keys"),
    ("POST", "/admin/openhands/keys", "add_key"),
    ("DELETE", "/admin/openhands/keys/{id}", "delete_key"),
    ("POST", "/admin/openhands/keys/{id}/reset", "reset_key"),
    ("PATCH", "/admin/openhands/keys/{id}/budget", "set_budget"),
    ("PATCH", "/admin/openhands/keys/{id}/spend", "set_spend"),
    ("GET", "/admin/openhands/backup-keys", "list_backups"),
    ("POST", "/admin/openhands/backup-keys", "add_backup"),
    ("DELETE", "/admin/openhands/backup-keys/{id}", "delete_backup"),
    ("GET", "/admin/openhands/spend-summary", "spend_summary"),
    ("GET", "/admin/openhands/spend-history", "spend_history"),
    ("GET", "/openhands/spend-stats", "spend_stats"),
    ("GET", "/admin/openhands", "dashboard"),
    ("GET", "/admin/openhands/", "dashboard"),
)


def route(method: str, raw_path: str) -> Route:
    """Match a request to a route; ApiError 400/404/405 for anything else."""
    path = raw_path.split("?", 1)[0]
    if len(path) > MAX_PATH:
        raise ApiError(414, f"path too long ({len(path)} characters; limit {MAX_PATH})")
    if "%" in path or "\\" in path or "//" in path or "/./" in path or "/../" in path or path.endswith(("/..", "/.")):
        raise ApiError(400, "path must not contain encoded characters, empty or dot segments")
    segments = path.split("/")
    allowed: list[str] = []
    for m, pattern, name in ROUTES:
        pseg = pattern.split("/")
        if len(pseg) != len(segments):
            continue
        key_id = None
        for ps, s in zip(pseg, segments, strict=True):
            if ps == "{id}":
                if not ID_RE.match(s) or ".." in s:
                    break
                key_id = s
            elif ps != s:
                break
        else:
            if m == method:
                return Route(name, key_id)
            allowed.append(m)
    if allowed:
        raise ApiError(405, f"method {method} not allowed here; use {', '.join(sorted(set(allowed)))}")
    raise ApiError(404, f"no admin endpoint at {_shown(path, 120)}")


def _shown(text: str, limit: int = 64) -> str:
    """Client text echoed in an error: bounded, and anything key-like masked."""
    text = _KEYLIKE.sub(lambda m: mask_key(m.group(0)), text)
    return text if len(text) <= limit else text[:limit] + "…"


_KEYLIKE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{19,}")


def _too_deep(body: bytes) -> bool:
    """Nesting depth over MAX_DEPTH, counted outside strings (cheap, linear, no recursion)."""
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ApiError(400, f"number with {len(text)} digits is not a value this API accepts")
    return int(text)


def parse_json_object(body: bytes | None) -> dict[str, Any]:
    if body is None or not body.strip():
        raise ApiError(400, "a JSON object body is required")
    if len(body) > MAX_BODY:
        raise ApiError(413, f"body too large ({len(body)} bytes; limit {MAX_BODY})")
    if _too_deep(body):
        raise ApiError(400, f"body is nested more than {MAX_DEPTH} levels deep")
    try:
        value = json.loads(body, parse_constant=_reject_constant, parse_int=_parse_int)
    except ApiError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError, OverflowError) as e:
        raise ApiError(400, f"body is not valid JSON: {e.__class__.__name__}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(value).__name__}")
    return value


def _reject_constant(name: str) -> Any:
    raise ApiError(400, f"{name} is not a number this API accepts")


def require_id(body: dict[str, Any], field: str = "id") -> str:
    value = body.get(field)
    if not isinstance(value, str) or not ID_RE.match(value) or ".." in value:
        raise ApiError(400, f"'{field}' must be a string of 1-128 letters, digits, '_', '.', ':', '@' or '-'")
    return value


def require_api_key(body: dict[str, Any]) -> str:
    value = body.get("apiKey")
    if not isinstance(value, str) or not value or len(value) > 512 or any(c.isspace() for c in value) \
            or not value.isprintable():
        raise ApiError(400, "'apiKey' must be a non-empty string without spaces (at most 512 characters)")
    return value


def require_money(body: dict[str, Any], field: str, *, positive: bool, required: bool = True,
                  maximum: float = 1_000_000.0) -> float | None:
    if field not in body and not required:
        return None
    value = body.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{field}' must be a number")
    try:
        value = float(value)
    except OverflowError:
        raise ApiError(400, f"'{field}' must be finite") from None
    if not math.isfinite(value):
        raise ApiError(400, f"'{field}' must be finite")
    if value < 0 or (positive and value == 0):
        raise ApiError(400, f"'{field}' must be {'greater than 0' if positive else 'zero or more'}")
    if value > maximum:
        raise ApiError(400, f"'{field}' must be at most {maximum:g}")
    return value


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        shown = ", ".join(_shown(name, 40) for name in unknown[:5])
        raise ApiError(400, f"unknown field(s): {shown}{' …' if len(unknown) > 5 else ''}")


def parse_limit(query: dict[str, list[str]], default: int = 100, maximum: int = 1000) -> int:
    raw = query.get("limit", [str(default)])[-1]
    if not re.fullmatch(r"[0-9]{1,7}", raw) or not 1 <= int(raw) <= maximum:
        raise ApiError(400, f"'limit' must be an integer from 1 to {maximum}")
    return int(raw)




def authorized(auth_header: str | None, token: str | None, peer: str | None) -> bool:
    """Bearer token in constant time; with no token configured, loopback clients only."""
    if token is None:
        return is_loopback(peer)
    if not auth_header or auth_header[:7].lower() != "bearer ":
        return False
    return hmac.compare_digest(auth_header[7:].strip().encode(), token.encode())


ADMIN_DEADLINE_S = 6.0  # a hung MongoDB gets its 503 within this, however many steps the change has


class AdminApi:
    def __init__(self, pool: Pool, *, threshold: Callable[[], float], stats: Callable[[], dict[str, Any]],
                 dashboard: Callable[..., str] | None = None, on_change: Callable[[str], None] | None = None) -> None:
        self.pool = pool
        self.threshold = threshold
        self.stats = stats
        self.dashboard = dashboard
        self.on_change = on_change or (lambda _: None)
        # The route table's names, each to its handler: explicit, so a renamed handler fails at start.
        self.handlers: dict[str, Callable[[Route, bytes | None, dict], tuple[int, Any]]] = {
            "list_keys": self.do_list_keys, "add_key": self.do_add_key, "delete_key": self.do_delete_key,
            "reset_key": self.do_reset_key, "set_budget": self.do_set_budget, "set_spend": self.do_set_spend,
            "list_backups": self.do_list_backups, "add_backup": self.do_add_backup,
            "delete_backup": self.do_delete_backup, "spend_summary": self.do_spend_summary,
            "spend_history": self.do_spend_history, "spend_stats": self.do_spend_stats,
            "dashboard": self.do_dashboard,
        }
        missing = {name for _, _, name in ROUTES} - set(self.handlers)
        assert not missing, f"admin routes without a handler: {missing}"

    def handle(self, method: str, path: str, body: bytes | None) -> tuple[int, Any]:
        """Blocking: run off the event loop. Returns (status, JSON-able body or HTML str)."""
        try:
            r = route(method, path)
            query = parse_qs(path.split("?", 1)[1], max_num_fields=50) if "?" in path else {}
            if method != "GET" and self.pool.writer.outage_since is not None:
                # The writer already knows MongoDB is down: say so now, not after a socket timeout per step.
                raise DatabaseError("database outage in progress")
            with self.pool.store.deadline(ADMIN_DEADLINE_S):
                status, answer = self.handlers[r.name](r, body, query)
            return status, answer if isinstance(answer, str) else strict_json(answer)
        except ValueError as e:  # parse_qs: too many fields
            return 400, {"error": {"message": f"bad query string: {_shown(str(e), 80)}",
                                   "type": "invalid_request_error", "code": 400}}
        except ApiError as e:
            return e.status, {"error": {"message": e.message, "type": "invalid_request_error", "code": e.status}}
        except DatabaseError as e:  # the request path serves from memory; admin changes need the database
            return 503, {"error": {"message": f"database unavailable ({e.__class__.__name__}); the change was not "
                                              "made, retry when MongoDB is back", "type": "service_unavailable",
                                   "code": 503}}

    # -- keys ---------------------------------------------------------------------------------
    def do_list_keys(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        keys = self.pool.snapshot_public()
        return 200, {"keys": keys, "stats": self._stats(keys)}

    def _stats(self, keys: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "totalKeys": len(keys),
            "healthyKeys": sum(1 for k in keys if k["status"] == Status.HEALTHY),
            "exhaustedKeys": sum(1 for k in keys if k["status"] == Status.EXHAUSTED),
            "rateLimitedKeys": sum(1 for k in keys if k["status"] == Status.RATE_LIMITED),
            "invalidKeys": sum(1 for k in keys if k["status"] == Status.INVALID),
            "backupKeysAvailable": self.pool.backups_unused,
            "backupKeysTotal": self.pool.backups_total,
            "threshold": self.threshold(),
        }

    def do_add_key(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        data = parse_json_object(body)
        check_fields(data, {"id", "apiKey", "budgetLimit"})
        key_id, api_key = require_id(data), require_api_key(data)
        budget = require_money(data, "budgetLimit", positive=True, required=False)
        if self.pool.store.backup_exists(key_id):  # its promotion would silently keep this key instead
            raise ApiError(409, f"a backup key already has id {key_id!r}")
        if not self.pool.add_key(key_id, api_key, budget):
            raise ApiError(409, f"key {key_id!r} already exists")
        self.on_change(f"added key {key_id}")
        key = self.pool.get(key_id)
        return 201, {"key": key.public(self.threshold()) if key else {"id": key_id, "apiKey": mask_key(api_key)}}

    def _existing(self, key_id: str | None) -> str:
        if key_id is None or self.pool.get(key_id) is None:
            self.pool.sync()
            if key_id is None or self.pool.get(key_id) is None:
                raise ApiError(404, f"no key with id {key_id!r}")
        return key_id

    def do_delete_key(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        key_id = self._existing(r.key_id)
        if not self.pool.delete_key(key_id):
            raise ApiError(404, f"no key with id {key_id!r}")
        self.on_change(f"deleted key {key_id}")
        return 200, {"deleted": key_id}

    def do_reset_key(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        key_id = self._existing(r.key_id)
        if body and body.strip():
            check_fields(parse_json_object(body), set())
        self.pool.reset_key(key_id)
        self.on_change(f"reset key {key_id}")
        return 200, {"key": self.pool.get(key_id).public(self.threshold())}  # type: ignore[union-attr]

    def do_set_budget(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        data = parse_json_object(body)
        check_fields(data, {"budgetLimit"})
        budget = require_money(data, "budgetLimit", positive=True)
        key_id = self._existing(r.key_id)
        self.pool.set_fields(key_id, {"budgetLimit": budget})
        return 200, {"key": self.pool.get(key_id).public(self.threshold())}  # type: ignore[union-attr]

    def do_set_spend(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        data = parse_json_object(body)
        check_fields(data, {"spendEstimate"})
        spend = require_money(data, "spendEstimate", positive=False)
        key_id = self._existing(r.key_id)
        self.pool.set_fields(key_id, {"spendEstimate": spend})
        return 200, {"key": self.pool.get(key_id).public(self.threshold())}  # type: ignore[union-attr]

    # -- backups ------------------------------------------------------------------------------
    def do_list_backups(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        rows = [{"id": str(b["_id"]), "apiKey": mask_key(b.get("apiKey")), "isUsed": bool(b.get("isUsed")),
                 "usedFor": b.get("usedFor"), "usedAt": _iso(b.get("usedAt")), "createdAt": _iso(b.get("createdAt"))}
                for b in self.pool.store.list_backups()]
        return 200, {"backupKeys": rows, "stats": {"total": len(rows),
                                                   "available": sum(1 for b in rows if not b["isUsed"])}}

    def do_add_backup(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        data = parse_json_object(body)
        check_fields(data, {"id", "apiKey"})
        backup_id, api_key = require_id(data), require_api_key(data)
        if self.pool.get(backup_id) is not None:
            raise ApiError(409, f"an active key already has id {backup_id!r}")
        if not self.pool.store.insert_backup(backup_id, api_key):
            raise ApiError(409, f"backup key {backup_id!r} already exists")
        self.pool.sync()
        self.on_change(f"added backup {backup_id}")
        return 201, {"backupKey": {"id": backup_id, "apiKey": mask_key(api_key), "isUsed": False}}

    def do_delete_backup(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        if r.key_id is None or not self.pool.store.delete_backup(r.key_id):
            raise ApiError(404, f"no backup key with id {r.key_id!r}")
        self.pool.sync()
        return 200, {"deleted": r.key_id}

    # -- spend ----------------------------------------------------------------------------------
    def do_spend_summary(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        threshold = self.threshold()
        keys = self.pool.key_list()
        rows = []
        for k in sorted(keys, key=lambda k: k.id):
            point = rotation_point(k.budget_limit, threshold)
            rows.append({"id": k.id, "apiKey": mask_key(k.api_key), "status": k.status,
                         "spendEstimate": round(k.spend_estimate, 6), "totalSpend": round(k.total_spend, 6),
                         "effectiveSpend": round(k.effective_spend, 6), "budgetLimit": k.budget_limit,
                         "rotationPoint": round(point, 6),
                         "remaining": round(max(0.0, k.budget_limit - k.effective_spend), 6),
                         "spendPercentage": round(100 * k.effective_spend / k.budget_limit, 2) if k.budget_limit else 0,
                         "lastSpendCheck": iso(k.last_spend_check), "lastUsedAt": iso(k.last_used_at)})
        total_budget = sum(k.budget_limit for k in keys)
        total_spend = sum(k.effective_spend for k in keys)
        return 200, {
            "threshold": threshold,
            "totalKeys": len(keys),
            "healthyKeys": sum(1 for k in keys if k.status == Status.HEALTHY),
            "totalBudget": round(total_budget, 6),
            "totalSpend": round(total_spend, 6),
            "remainingBudget": round(sum(max(0.0, k.budget_limit - k.effective_spend) for k in keys
                                         if k.status in (Status.HEALTHY, Status.RATE_LIMITED)), 6),
            "backupKeys": {"available": self.pool.backups_unused, "total": self.pool.backups_total},
            "keys": rows,
        }

    def do_spend_history(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        limit = parse_limit(q)
        key_id = q.get("keyId", [None])[-1]
        if key_id is not None and (not ID_RE.match(key_id) or ".." in key_id):
            raise ApiError(400, "'keyId' is not a valid key id")
        rows = self.pool.store.list_history(limit, key_id)
        for row in rows:
            for name in ("checkedAt", "rotatedAt"):
                row[name] = _iso(row.get(name))
        return 200, {"history": rows, "count": len(rows)}

    def do_spend_stats(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        return 200, self.stats()

    def do_dashboard(self, r: Route, body: bytes | None, q: dict) -> tuple[int, Any]:
        if self.dashboard is None:
            raise ApiError(404, "no dashboard in this build")
        # The page is rendered from exactly what the JSON endpoints return.
        _, summary = self.do_spend_summary(r, None, {})
        rows = self.pool.store.list_history(DASHBOARD_HISTORY, None)
        for row in rows:
            for name in ("checkedAt", "rotatedAt"):
                row[name] = _iso(row.get(name))
        return 200, self.dashboard(summary, rows, self.stats(), self.pool.snapshot_public())


def strict_json(value: Any, depth: int = 0) -> Any:
    """The answer as strict JSON: non-finite floats (a hand-edited document, a hostile upstream number)
    become null, so clients never receive `Infinity` or `NaN`, which are not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth > 64:
        return None
    if isinstance(value, dict):
        return {k: strict_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v, depth + 1) for v in value]
    return value


def redact_admin_body(raw: bytes | None) -> bytes | None:
    """An admin request body with no full key left in it, whatever its form (for the flow: `-w`, mitmweb).

    A JSON object keeps its ids and numbers and has every other string masked (`apiKey`, a misspelled
    `apikey`, anything); a body that is not a JSON object — a trailing comma, form encoding, a bare
    key — is replaced by a note of its size, because nothing in it can be told apart from a key.
    """
    if not raw:
        return raw
    try:
        if len(raw) > MAX_BODY or _too_deep(raw):
            raise ValueError
        value = json.loads(raw, parse_int=_parse_int, parse_constant=_reject_constant)
        if not isinstance(value, dict):
            raise ValueError
    except (ValueError, ApiError, UnicodeDecodeError, RecursionError, OverflowError):
        return f"<admin request body removed: {len(raw)} bytes, not a JSON object>".encode()
    return json.dumps(_redact_value(value, None), separators=(",", ":")).encode()


_SAFE_FIELDS = {"id", "keyId"}


def _redact_value(value: Any, field: str | None) -> Any:
    if isinstance(value, dict):
        return {(_shown(k, 40) if isinstance(k, str) else k): _redact_value(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(v, field) for v in value]
    if isinstance(value, str):
        if field in _SAFE_FIELDS and ID_RE.match(value) and len(value) <= 64 and not _KEYLIKE.fullmatch(value):
            return value
        return mask_key(value)
    return value


def _iso(value: Any) -> str | None:
    from addon.store.mongo import to_epoch

    return iso(to_epoch(value))
