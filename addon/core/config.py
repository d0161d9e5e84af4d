"""Settings: mitmproxy options with the precedence defaults < mitm.toml < environment < --set.

Every setting is a mitmproxy option so `--set` and mitmweb's options page work. The file and the
environment are folded into the option *defaults* at `load()`, which is exactly what makes a later
`--set` win. Secrets (admin token, client keys) never live in an option value: options are printed by
mitmweb and `--options`, so they come from the environment or from a file named by an option.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from addon.core.rotation_policy import NOMINAL_BUDGET
from addon.core.routes import NO_EXTRA, ExtraRoutes
from addon.core.spend_tiers import DEFAULT_TIERS, Tier, parse_tiers

DEFAULT_UPSTREAM = "https://llm-proxy.app.all-hands.dev"


def float_text(value: float) -> str:
    """A number as an option string: mitmproxy 11/12 have no float option type (`--set x=9.8` fails on one)."""
    return repr(float(value))


@dataclass(frozen=True)
class OptionSpec:
    """One option. Declared `float` ones become `str` options holding the number's text, so `--set`,
    mitm.toml and the environment all work; `build_settings` parses them and names option and value."""

    name: str
    typespec: Any
    default: Any
    env: str | None
    help: str
    number: bool = False

    def __post_init__(self) -> None:
        if self.typespec is float:
            object.__setattr__(self, "typespec", str)
            object.__setattr__(self, "default", float_text(self.default))
            object.__setattr__(self, "number", True)


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec("openhands_config", str, "", "OPENHANDS_CONFIG",
               "Path of the TOML configuration file (default: mitm.toml in the working directory, if present)."),
    OptionSpec("openhands_upstream", str, "", "OPENHANDS_UPSTREAM",
               "Base URL of the LiteLLM proxy whose host is pooled. Empty: the reverse-mode target "
               f"(--mode reverse:URL), or {DEFAULT_UPSTREAM} in the other modes."),
    OptionSpec("openhands_mongodb_uri", str, "embedded", "MONGODB_URI",
               "MongoDB URI, or 'embedded' to start a local SecantusDB server as a child process."),
    OptionSpec("openhands_mongodb_db", str, "openhands_pool", "OPENHANDS_MONGODB_DB", "Database name."),
    OptionSpec("openhands_spend_threshold", float, 9.95, "OPENHANDS_SPEND_THRESHOLD",
               "Rotate a $10 key when its spend reaches this many dollars; other budgets keep the same margin."),
    OptionSpec("openhands_drain_past_point", bool, True, "OPENHANDS_DRAIN_PAST_POINT",
               "Past its rotation point a key keeps serving one request at a time while the upstream's own spend "
               "(x-litellm-key-spend) shows budget left, so its last cents are used; false: retire it at the point."),
    OptionSpec("openhands_spend_checker", bool, True, "OPENHANDS_SPEND_CHECKER",
               "Poll the upstream's real spend per key on a background thread."),
    OptionSpec("openhands_spend_check_tiers", str, "0:300,5:120,7:10", "OPENHANDS_SPEND_CHECK_TIERS",
               "Spend-check intervals as 'min_spend:seconds,...' (from $0 every 300 s, ...)."),
    OptionSpec("openhands_admin_token_file", Optional[str], None, None,
               "File holding the admin API token (or set OPENHANDS_ADMIN_TOKEN). None: loopback clients only."),
    OptionSpec("openhands_client_keys_file", Optional[str], None, None,
               "File listing allowed client keys, one per line (or OPENHANDS_CLIENT_KEYS, comma-separated)."),
    OptionSpec("openhands_default_budget", float, NOMINAL_BUDGET, "OPENHANDS_DEFAULT_BUDGET",
               "budgetLimit given to keys added without one and to promoted backup keys."),
    OptionSpec("openhands_fallback_price", str, "3:15", "OPENHANDS_FALLBACK_PRICE",
               "'input:output' dollars per 1M tokens for models missing from the price table."),
    OptionSpec("openhands_max_retries", int, 3, "OPENHANDS_MAX_RETRIES",
               "Upstream retries per request after budget, rate-limit or auth errors (one per key)."),
    OptionSpec("openhands_history_ttl_days", int, 30, "OPENHANDS_HISTORY_TTL_DAYS",
               "Days spend-history rows are kept (TTL index)."),
    OptionSpec("openhands_data_dir", str, "", "OPENHANDS_DATA_DIR",
               "Directory for the embedded database and the write journal (default ~/.local/share/openhands-pool)."),
    OptionSpec("openhands_spend_check_tick_seconds", float, 1.0, "OPENHANDS_SPEND_CHECK_TICK_SECONDS",
               "How often the spend checker wakes up to see which keys are due "
               "(the tiers set how often each is polled)."),
    OptionSpec("openhands_spend_check_lease_seconds", float, 30.0, "OPENHANDS_SPEND_CHECK_LEASE_SECONDS",
               "Lease period of the one spend poller per pool; another sidecar takes over within it "
               "when the poller dies."),
    OptionSpec("openhands_spend_check_timeout_seconds", float, 10.0, "OPENHANDS_SPEND_CHECK_TIMEOUT_SECONDS",
               "Connect and read timeout of each spend poll (the activity endpoint)."),
    OptionSpec("openhands_journal_fsync_ms", int, 100, "OPENHANDS_JOURNAL_FSYNC_MS",
               "The write-ahead journal is fsynced at most this often (0: after every update); "
               "every update reaches the OS at once."),
    OptionSpec("openhands_journal_max_mb", int, 256, "OPENHANDS_JOURNAL_MAX_MB",
               "Size cap of the write-ahead journal; beyond it updates are kept in memory only, with a loud warning."),
    OptionSpec("openhands_binding_ttl_days", int, 7, "OPENHANDS_BINDING_TTL_DAYS",
               "Days a client binding is kept after its last update (TTL index on updatedAt)."),
    OptionSpec("openhands_metrics_loopback", bool, False, "OPENHANDS_METRICS_LOOPBACK",
               "Let loopback clients scrape GET /metrics without the admin token (the admin API keeps its rule)."),
    OptionSpec("openhands_stream_copy_bytes", int, 4 << 20, "OPENHANDS_STREAM_COPY_BYTES",
               "When flows are kept (mitmweb, a -w flow file), keep up to this many bytes of each streamed response "
               "as its body (beyond it the head and the tail); 0 keeps nothing. Plain mitmdump keeps nothing."),
    OptionSpec("openhands_open_pool", bool, False, "OPENHANDS_OPEN_POOL",
               "Serve the pool to any client that reaches the sidecar. Default: with no client allowlist "
               "(OPENHANDS_CLIENT_KEYS), loopback clients only."),
    OptionSpec("openhands_extra_routes", str, "", "OPENHANDS_EXTRA_ROUTES",
               "Extra upstream routes to pool, comma-separated ('/x/y' exact, '/x/*' prefix); every other "
               "non-LLM route of the upstream gets 403 and never a pool key."),
)
OPTION_NAMES = frozenset(o.name for o in OPTIONS)


class ConfigError(ValueError):
    """A setting with a bad value; the message names the setting and the value."""


def parse_bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def coerce(spec: OptionSpec, raw: Any, origin: str) -> Any:
    """Convert a value from mitm.toml or the environment to the option's type."""
    where = f"{spec.name} (from {origin})"
    try:
        if spec.typespec is bool:
            return parse_bool(where, raw)
        if spec.number:
            if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
                raise ValueError
            float(raw)  # a number, or the ValueError below
            return raw.strip() if isinstance(raw, str) else float_text(raw)
        if spec.typespec is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if spec.name == "openhands_spend_check_tiers" and isinstance(raw, list):
            return format_tiers(parse_tiers(raw))
        if not isinstance(raw, str):
            raise ValueError
        return raw
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: invalid value {raw!r}") from None


def format_tiers(tiers: tuple[Tier, ...]) -> str:
    return ",".join(f"{t.min_spend:g}:{t.interval_s:g}" for t in tiers)


def parse_tier_string(value: str) -> tuple[Tier, ...]:
    """'0:300,5:120,7:10' -> tiers; ConfigError names the option and the value."""
    rows = []
    try:
        for part in value.split(","):
            lo, _, secs = part.strip().partition(":")
            rows.append({"min_spend": float(lo), "interval_seconds": float(secs)})
        return parse_tiers(rows)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"openhands_spend_check_tiers: invalid value {value!r} ({e})") from None


def config_path(explicit: str, environ: dict[str, str], cwd: Path) -> Path | None:
    if explicit:
        return Path(explicit).expanduser()
    if environ.get("OPENHANDS_CONFIG"):
        return Path(environ["OPENHANDS_CONFIG"]).expanduser()
    default = cwd / "mitm.toml"
    return default if default.is_file() else None


def read_toml(path: Path | None, *, required: bool) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise ConfigError(f"openhands_config: file not found: {str(path)!r}") from None
        return {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"openhands_config: cannot read {str(path)!r}: {e}") from None
    # mitm.toml may group the settings under [openhands] or keep them at top level.
    settings = dict(data.get("openhands", {})) if isinstance(data.get("openhands"), dict) else {}
    settings.update({k: v for k, v in data.items() if k != "openhands"})
    unknown = sorted(k for k in settings if k not in OPTION_NAMES)
    if unknown:
        raise ConfigError(f"openhands_config: unknown setting(s) {', '.join(unknown)} in {str(path)!r}")
    return settings


def layered_defaults(environ: dict[str, str], cwd: Path, explicit_config: str = "") -> dict[str, Any]:
    """Built-in defaults overlaid with mitm.toml, then the environment."""
    path = config_path(explicit_config, environ, cwd)
    required = bool(explicit_config or environ.get("OPENHANDS_CONFIG"))
    from_file = read_toml(path, required=required)
    values: dict[str, Any] = {}
    for spec in OPTIONS:
        value = spec.default
        if spec.name in from_file:
            value = coerce(spec, from_file[spec.name], f"{path}")
        if spec.env and environ.get(spec.env, "") != "" and spec.name != "openhands_config":
            value = coerce(spec, environ[spec.env], f"environment {spec.env}")
        values[spec.name] = value
    if path is not None:
        values["openhands_config"] = str(path)
    return values


@dataclass(frozen=True)
class Settings:
    """Validated settings the addon runs with."""

    upstream: str
    upstream_scheme: str
    upstream_host: str
    upstream_port: int
    mongodb_uri: str
    mongodb_db: str
    spend_threshold: float
    spend_checker: bool
    tiers: tuple[Tier, ...]
    default_budget: float
    fallback_price: tuple[float, float]
    max_retries: int
    history_ttl_days: int
    data_dir: Path
    admin_token: str | None = field(repr=False, default=None)
    client_keys: frozenset[str] = field(repr=False, default=frozenset())

    def is_upstream(self, host: str, port: int) -> bool:
        """A flow is pooled when it goes to the upstream's host and port; others pass untouched."""
        return host.lower() == self.upstream_host and port == self.upstream_port
    spend_check_tick_s: float = 1.0
    spend_check_lease_s: float = 30.0
    spend_check_timeout_s: float = 10.0
    journal_fsync_s: float = 0.1
    journal_max_bytes: int = 256 << 20
    binding_ttl_days: int = 7
    metrics_loopback: bool = False
    stream_copy_bytes: int = 4 << 20
    open_pool: bool = False
    drain_past_point: bool = True
    extra_routes: ExtraRoutes = NO_EXTRA


def parse_upstream(url: str) -> tuple[str, str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"openhands_upstream: expected an http(s) URL, got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"openhands_upstream: bad port in {url!r}") from None
    return parts.scheme, parts.hostname.lower(), port


def read_secret_file(option: str, path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{option}: cannot read {path!r}: {e.__class__.__name__}") from None


def default_data_dir(environ: dict[str, str]) -> Path:
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "openhands-pool"


def resolve_upstream(targets: Sequence[str], explicit: str | None) -> str:
    """The upstream whose host is pooled: the upstream follows the mode.

    In reverse mode the reverse target is the upstream; an explicit `openhands_upstream` must then be that
    same target (scheme, host, port), else ConfigError naming both. Without a reverse mode: the explicit
    one, or the OpenHands proxy.
    """
    explicit = (explicit or "").strip() or None
    if explicit is not None:
        origin = parse_upstream(explicit)
        if targets and not any(parse_upstream(t) == origin for t in targets):
            raise ConfigError(
                f"openhands_upstream: {explicit!r} is not the reverse-mode target "
                f"{' or '.join(repr(t) for t in targets)}; the sidecar can only pool the host mitmproxy "
                f"forwards to (drop openhands_upstream, or make it match --mode)")
        return explicit.rstrip("/")
    if len(targets) > 1:
        raise ConfigError(f"openhands_upstream: several reverse-mode targets ({', '.join(targets)}); "
                          f"set openhands_upstream to the one to pool")
    if targets:
        return targets[0]
    return DEFAULT_UPSTREAM


def build_settings(values: dict[str, Any], environ: dict[str, str], reverse_targets: Sequence[str] = ()) -> Settings:
    """Validate option values; ConfigError names the option and the value.

    `reverse_targets` are the upstream URLs of mitmproxy's `reverse:` modes (parsed at the edge, by
    `traffic.upstream_http.reverse_targets`): in reverse mode the reverse target is the upstream.
    """
    upstream = resolve_upstream(reverse_targets, values["openhands_upstream"])
    scheme, host, port = parse_upstream(upstream)
    threshold = _number(values, "openhands_spend_threshold")
    if not math.isfinite(threshold) or not 0 < threshold <= NOMINAL_BUDGET:
        raise ConfigError(f"openhands_spend_threshold: must be in (0, 10], got {values['openhands_spend_threshold']!r}")
    budget = _number(values, "openhands_default_budget")
    if not math.isfinite(budget) or budget <= 0:
        raise ConfigError(f"openhands_default_budget: must be a positive number, got "
                          f"{values['openhands_default_budget']!r}")
    uri = values["openhands_mongodb_uri"].strip()
    if uri != "embedded" and not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError(f"openhands_mongodb_uri: expected 'embedded' or a mongodb:// URI, got {mask_uri(uri)!r}")
    db = values["openhands_mongodb_db"]
    if not db or any(c in db for c in '/\\. "$') or len(db) > 63:
        raise ConfigError(f"openhands_mongodb_db: invalid database name {db!r}")
    try:
        fb_in, fb_out = (float(x) for x in values["openhands_fallback_price"].split(":"))
        if not (math.isfinite(fb_in) and math.isfinite(fb_out) and fb_in >= 0 and fb_out >= 0):
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"openhands_fallback_price: expected 'input:output' dollars per 1M tokens, "
            f"got {values['openhands_fallback_price']!r}") from None
    retries = values["openhands_max_retries"]
    if not 0 <= retries <= 10:
        raise ConfigError(f"openhands_max_retries: must be 0..10, got {retries!r}")
    ttl = values["openhands_history_ttl_days"]
    if not 1 <= ttl <= 3650:
        raise ConfigError(f"openhands_history_ttl_days: must be 1..3650, got {ttl!r}")

    tick = _seconds(values, "openhands_spend_check_tick_seconds", 1.0, 0.05, 60.0)
    lease = _seconds(values, "openhands_spend_check_lease_seconds", 30.0, 1.0, 3600.0)
    if lease < 3 * tick:  # the poller renews at least twice per lease period, so a slow tick never loses it
        raise ConfigError(f"openhands_spend_check_lease_seconds: must be at least 3 x "
                          f"openhands_spend_check_tick_seconds ({3 * tick:g}), "
                          f"got {values.get('openhands_spend_check_lease_seconds')!r}")
    poll_timeout = _seconds(values, "openhands_spend_check_timeout_seconds", 10.0, 0.1, 300.0)
    fsync_ms = values.get("openhands_journal_fsync_ms", 100)
    if isinstance(fsync_ms, bool) or not isinstance(fsync_ms, int) or not 0 <= fsync_ms <= 10_000:
        raise ConfigError(f"openhands_journal_fsync_ms: must be 0..10000 milliseconds, got {fsync_ms!r}")
    journal_mb = values.get("openhands_journal_max_mb", 256)
    if isinstance(journal_mb, bool) or not isinstance(journal_mb, int) or not 1 <= journal_mb <= 1_000_000:
        raise ConfigError(f"openhands_journal_max_mb: must be 1..1000000, got {journal_mb!r}")
    binding_ttl = values.get("openhands_binding_ttl_days", 7)
    if isinstance(binding_ttl, bool) or not isinstance(binding_ttl, int) or not 1 <= binding_ttl <= 3650:
        raise ConfigError(f"openhands_binding_ttl_days: must be 1..3650, got {binding_ttl!r}")
    stream_copy = values.get("openhands_stream_copy_bytes", 4 << 20)
    if isinstance(stream_copy, bool) or not isinstance(stream_copy, int) or not 0 <= stream_copy <= 1 << 30:
        raise ConfigError(f"openhands_stream_copy_bytes: must be 0..1073741824 bytes, got {stream_copy!r}")

    token = environ.get("OPENHANDS_ADMIN_TOKEN") or None
    if values.get("openhands_admin_token_file"):
        token = read_secret_file("openhands_admin_token_file", values["openhands_admin_token_file"]).strip() or None
    if token is not None and len(token) < 8:
        raise ConfigError("openhands_admin_token: the admin token must be at least 8 characters")

    keys_text = environ.get("OPENHANDS_CLIENT_KEYS", "")
    if values.get("openhands_client_keys_file"):
        keys_text = read_secret_file("openhands_client_keys_file", values["openhands_client_keys_file"])
    client_keys = frozenset(k.strip() for k in keys_text.replace("\n", ",").split(",") if k.strip())

    data_dir = (Path(values["openhands_data_dir"]).expanduser() if values["openhands_data_dir"]
                else default_data_dir(environ))
    return Settings(
        upstream=upstream,
        upstream_scheme=scheme,
        upstream_host=host,
        upstream_port=port,
        mongodb_uri=uri,
        mongodb_db=db,
        spend_threshold=threshold,
        spend_checker=values["openhands_spend_checker"],
        tiers=parse_tier_string(values["openhands_spend_check_tiers"]),
        default_budget=budget,
        fallback_price=(fb_in, fb_out),
        max_retries=retries,
        history_ttl_days=ttl,
        data_dir=data_dir,
        admin_token=token,
        client_keys=client_keys,
        spend_check_tick_s=tick,
        spend_check_lease_s=lease,
        spend_check_timeout_s=poll_timeout,
        journal_fsync_s=fsync_ms / 1000.0,
        journal_max_bytes=journal_mb << 20,
        binding_ttl_days=binding_ttl,
        metrics_loopback=bool(values.get("openhands_metrics_loopback", False)),
        stream_copy_bytes=stream_copy,
        open_pool=bool(values.get("openhands_open_pool", False)),
        drain_past_point=bool(values.get("openhands_drain_past_point", True)),
        extra_routes=_extra_routes(values.get("openhands_extra_routes", "")),
    )


def _extra_routes(spec: str) -> ExtraRoutes:
    try:
        return ExtraRoutes.parse(spec or "")
    except ValueError as e:
        raise ConfigError(f"openhands_extra_routes: {e}") from None


def _number(values: dict[str, Any], name: str, default: float | None = None) -> float:
    """A number option: its text (`--set`, the options page) or a number (older callers, tests)."""
    raw = values.get(name, default)
    try:
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ValueError
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None


def _seconds(values: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    """A duration option in [low, high]; absent (older callers) means its default."""
    value = _number(values, name, default)
    if not math.isfinite(value) or not low <= value <= high:
        raise ConfigError(f"{name}: must be a number of seconds from {low:g} to {high:g}, "
                          f"got {values.get(name, default)!r}")
    return value


def mask_uri(uri: str) -> str:
    """Hide credentials in a MongoDB URI for logs and the banner."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest:
        return uri
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


__all__ = ["OPTIONS", "OPTION_NAMES", "ConfigError", "Settings", "build_settings", "layered_defaults",
           "mask_uri", "parse_tier_string", "resolve_upstream", "DEFAULT_TIERS"]
