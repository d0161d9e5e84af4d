"""mitmproxy commands (`openhands.*`), usable from mitmweb's command bar and the console.

mitmproxy runs commands synchronously on its event loop, and the loop never waits on MongoDB
(DESIGN §4). So `openhands.keys` reads the in-memory pool only, and the commands that change the pool
check their arguments at once (cheap, in memory), then hand the MongoDB work to one background worker
and return a "started" line; the outcome is logged (`🛠️ [OpenHands/Command] …`) when it lands. One
worker runs them in order, so `add` then `budget` typed in quick succession apply in that order.
"""
from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable

from mitmproxy import exceptions

from addon.operator.admin_api import ID_RE
from addon.core.masking import mask_key

if TYPE_CHECKING:
    from addon.services import Services

log = logging.getLogger(__name__)

MAX_API_KEY = 512


def check_id(key_id: str) -> str:
    """The admin API's id rule, so ids typed in the console are the ids the API accepts."""
    if not isinstance(key_id, str) or not ID_RE.match(key_id) or ".." in key_id:
        raise exceptions.CommandError(f"invalid key id {key_id!r}: use 1-128 letters, digits, '_', '.', ':', '@', '-'")
    return key_id


def check_api_key(api_key: str) -> str:
    if not isinstance(api_key, str) or not api_key or len(api_key) > MAX_API_KEY or not api_key.isprintable() \
            or any(c.isspace() for c in api_key):
        raise exceptions.CommandError("api key must be a non-empty string without spaces (at most 512 characters)")
    return api_key


class KeyInArgument(exceptions.CommandError):
    """A full key typed as a command argument (refused, and scrubbed from the command history)."""


def scrub_command_history(secret: str) -> int:
    """Remove every command-history entry holding `secret`, in memory and in `<confdir>/command_history`.

    mitmweb's command bar and the console record a command line *before* running it, so a key typed by
    mistake is already on disk when the command refuses it. Returns how many entries were removed.
    """
    if not secret or len(secret) < 8:
        return 0
    removed = 0
    try:
        from mitmproxy import ctx

        history = ctx.master.addons.get("commandhistory")
        if history is not None:
            before = len(history.history)
            history.history = [line for line in history.history if secret not in line]
            removed = before - len(history.history)
            history.set_filter("")
            path = history.history_file
            if path.is_file():
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
                kept = [line for line in lines if secret not in line]
                if len(kept) != len(lines):
                    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
                    removed = max(removed, len(lines) - len(kept))
    except Exception as e:  # noqa: BLE001 - scrubbing is best effort; the refusal stands regardless
        log.warning("🛠️ [OpenHands/Command] could not scrub the command history: %s", e.__class__.__name__)
    return removed


def read_key_source(source: str) -> str:
    """The API key named by a command argument: `env:NAME` (or `$NAME`) reads an environment variable,
    anything else is a file path holding the key (surrounding whitespace ignored).

    Commands never take the key itself: mitmproxy writes every command line to `command_history` in its
    confdir, and mitmweb shows the command bar. A full key typed there is refused.
    """
    import os
    from pathlib import Path

    if not isinstance(source, str) or not source.strip():
        raise exceptions.CommandError("give a file holding the key, or env:NAME for an environment variable")
    source = source.strip()
    if source.startswith(("env:", "$")):
        name = source[4:] if source.startswith("env:") else source[1:]
        if not name or not all(c.isalnum() or c == "_" for c in name):
            raise exceptions.CommandError(f"invalid environment variable name {name[:40]!r}")
        value = os.environ.get(name)
        if not value or not value.strip():
            raise exceptions.CommandError(f"environment variable {name} is not set or empty")
        return check_api_key(value.strip())
    path = Path(source).expanduser()
    try:
        if path.is_file():
            if path.stat().st_size > 4096:
                raise exceptions.CommandError(f"{source[:80]}: too large for a key file")
            return check_api_key(path.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError) as e:
        raise exceptions.CommandError(f"cannot read the key file: {e.__class__.__name__}") from None
    if source.startswith("sk-") or ("/" not in source and len(source) >= 16):
        raise KeyInArgument(
            "commands do not take a key itself (mitmproxy records command lines in its command history): put the "
            "key in a file and give its path, or in an environment variable and give env:NAME")
    raise exceptions.CommandError(f"no key file at {source[:80]!r}; give a file path or env:NAME")


def check_dollars(dollars: Any) -> float:
    """Commands arrive as strings from the command bar (mitmproxy has no float argument type)."""
    if isinstance(dollars, str):
        try:
            dollars = float(dollars.strip().lstrip("$"))
        except ValueError:
            raise exceptions.CommandError(f"budget must be a number of dollars, not {dollars!r}") from None
    if isinstance(dollars, bool) or not isinstance(dollars, (int, float)):
        raise exceptions.CommandError("budget must be a number of dollars")
    value = float(dollars)
    if not math.isfinite(value) or value <= 0 or value > 1_000_000:
        raise exceptions.CommandError("budget must be a positive number of dollars (at most 1000000)")
    return value


def keys_table(rows: list[dict[str, Any]], backups_unused: int, backups_total: int) -> str:
    """The `openhands.keys` table from `KeyState.public` rows (already masked)."""
    header = (f"{'id':<20} {'key':<18} {'status':<13} {'spend':>9} {'budget':>8} {'rotate@':>8} "
              f"{'%':>6} {'reqs':>6}")
    lines = [header, "-" * len(header)]
    for k in rows:
        spend = max(float(k.get("spendEstimate") or 0), float(k.get("totalSpend") or 0))
        lines.append(f"{str(k['id'])[:20]:<20} {str(k['apiKey'])[:18]:<18} {k['status']:<13} {spend:>9.4f} "
                     f"{k['budgetLimit']:>8.2f} {k['rotationPoint']:>8.2f} {k['spendPercentage']:>6.1f} "
                     f"{k['requestsCount']:>6}")
    lines.append(f"{len(rows)} key(s), {backups_unused}/{backups_total} backup(s) available")
    return "\n".join(lines)


class PoolCommands:
    def __init__(self, services: "Services", run: Callable[[str, Callable[[], str]], Future] | None = None) -> None:
        self.services = services
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._run = run or self._submit
        self.last: Future | None = None  # the most recent background job (tests wait on it)

    # -- plumbing -----------------------------------------------------------------------------
    def _pool(self):
        pool = self.services.pool
        if self.services.failed:
            raise exceptions.CommandError(f"the key pool is unavailable: {self.services.failed}")
        if pool is None or not self.services.ready.is_set():
            raise exceptions.CommandError("the key pool is not ready yet (still starting)")
        return pool

    def _submit(self, what: str, job: Callable[[], str]) -> Future:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openhands-command")
            return self._executor.submit(self._job, what, job)

    @staticmethod
    def _job(what: str, job: Callable[[], str]) -> str:
        """Runs on the worker: the outcome goes to the event log, where the operator looks next."""
        try:
            result = job()
        except Exception as e:
            log.warning("🛠️ [OpenHands/Command] %s failed: %s", what, e)
            return f"{what} failed: {e}"
        log.info("🛠️ [OpenHands/Command] %s", result)
        return result

    def _start(self, what: str, job: Callable[[], str]) -> str:
        self.last = self._run(what, job)
        return f"{what}: started; the result will appear in the event log"

    def close(self) -> None:
        """On unload: queued jobs still finish, but mitmproxy does not wait for them."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    @staticmethod
    def _key(source: str) -> str:
        try:
            return read_key_source(source)
        except KeyInArgument:
            if scrub_command_history(source.strip()):
                log.warning("🛠️ [OpenHands/Command] a key typed as a command argument was refused and removed from "
                            "mitmproxy's command history")
            raise

    # -- commands -----------------------------------------------------------------------------
    def keys(self) -> str:
        """Memory only: safe on the event loop."""
        pool = self._pool()
        return keys_table(pool.snapshot_public(), pool.backups_unused, pool.backups_total)

    def add(self, key_id: str, key_source: str) -> str:
        """`key_source`: a file holding the key, or env:NAME (see `read_key_source`)."""
        check_id(key_id)
        api_key = self._key(key_source)
        pool = self._pool()
        if pool.get(key_id) is not None:
            raise exceptions.CommandError(f"key {key_id!r} already exists")
        masked = mask_key(api_key)

        def job() -> str:
            if not pool.add_key(key_id, api_key, None):
                raise ValueError(f"key {key_id!r} already exists")
            return f"added key {key_id} ({masked})"

        return self._start(f"add key {key_id} ({masked})", job)

    def backup(self, key_id: str, key_source: str) -> str:
        """`key_source`: a file holding the key, or env:NAME (see `read_key_source`)."""
        check_id(key_id)
        api_key = self._key(key_source)
        pool = self._pool()
        if pool.get(key_id) is not None:
            raise exceptions.CommandError(f"an active key already has id {key_id!r}")
        masked = mask_key(api_key)

        def job() -> str:
            if not pool.store.insert_backup(key_id, api_key):
                raise ValueError(f"backup key {key_id!r} already exists")
            pool.sync()
            return f"added backup key {key_id} ({masked}); {pool.backups_unused}/{pool.backups_total} available"

        return self._start(f"add backup key {key_id} ({masked})", job)

    def _existing(self, key_id: str):
        check_id(key_id)
        pool = self._pool()
        if pool.get(key_id) is None:
            raise exceptions.CommandError(f"no key {key_id!r} (see openhands.keys)")
        return pool

    def rotate(self, key_id: str) -> str:
        pool = self._existing(key_id)

        def job() -> str:
            result = pool.rotate(key_id, error="rotated by operator command")
            return f"rotated {key_id} -> {result.new_id or 'nothing (no usable key or backup left)'}"

        return self._start(f"rotate {key_id}", job)

    def reset(self, key_id: str) -> str:
        pool = self._existing(key_id)

        def job() -> str:
            if not pool.reset_key(key_id):
                raise ValueError(f"no key {key_id!r}")
            return f"reset {key_id}: healthy, spend and counters at zero"

        return self._start(f"reset {key_id}", job)

    def budget(self, key_id: str, dollars: str | float) -> str:
        value = check_dollars(dollars)
        pool = self._existing(key_id)

        def job() -> str:
            if not pool.set_fields(key_id, {"budgetLimit": value}):
                raise ValueError(f"no key {key_id!r}")
            return f"{key_id} budget set to ${value:.2f}"

        return self._start(f"set {key_id} budget to ${value:.2f}", job)
