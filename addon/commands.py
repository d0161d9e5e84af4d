"""mitmproxy commands (`openhands.*`), usable from mitmweb's command bar and the console.

Commands are synchronous in mitmproxy; the MongoDB work they trigger is short and admin-initiated,
so it runs inline through the same pool methods the admin API uses.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from addon.admin_api import ID_RE
from addon.masking import mask_key

if TYPE_CHECKING:
    from addon.sidecar import Sidecar


class PoolCommands:
    def __init__(self, sidecar: "Sidecar") -> None:
        self.sidecar = sidecar

    def _pool(self):
        pool = self.sidecar.pool
        if pool is None or not self.sidecar.ready.is_set():
            raise ValueError("the key pool is not ready yet")
        return pool

    @staticmethod
    def _check_id(key_id: str) -> None:
        if not ID_RE.match(key_id) or ".." in key_id:
            raise ValueError(f"invalid key id {key_id!r}")

    def keys(self) -> str:
        pool = self._pool()
        rows = pool.snapshot_public()
        header = f"{'id':<20} {'key':<18} {'status':<13} {'spend':>9} {'budget':>8} {'rotate@':>8} {'%':>6} {'reqs':>6}"
        lines = [header, "-" * len(header)]
        for k in rows:
            lines.append(f"{k['id'][:20]:<20} {k['apiKey']:<18} {k['status']:<13} "
                         f"{max(k['spendEstimate'], k['totalSpend']):>9.4f} {k['budgetLimit']:>8.2f} "
                         f"{k['rotationPoint']:>8.2f} {k['spendPercentage']:>6.1f} {k['requestsCount']:>6}")
        lines.append(f"{len(rows)} key(s), {pool.backups_unused}/{pool.backups_total} backup(s) available")
        return "\n".join(lines)

    def add(self, key_id: str, api_key: str) -> str:
        self._check_id(key_id)
        if not api_key or any(c.isspace() for c in api_key):
            raise ValueError("api key must be non-empty and without spaces")
        if not self._pool().add_key(key_id, api_key, None):
            raise ValueError(f"key {key_id!r} already exists")
        return f"added {key_id} ({mask_key(api_key)})"

    def backup(self, key_id: str, api_key: str) -> str:
        self._check_id(key_id)
        if not api_key or any(c.isspace() for c in api_key):
            raise ValueError("api key must be non-empty and without spaces")
        pool = self._pool()
        if pool.get(key_id) is not None or not pool.store.insert_backup(key_id, api_key):
            raise ValueError(f"id {key_id!r} already exists")
        pool.sync()
        return f"added backup {key_id} ({mask_key(api_key)})"

    def rotate(self, key_id: str) -> str:
        self._check_id(key_id)
        pool = self._pool()
        if pool.get(key_id) is None:
            raise ValueError(f"no key {key_id!r}")
        result = pool.rotate(key_id, error="rotated by operator command")
        return f"rotated {key_id} -> {result.new_id or 'nothing (no usable key or backup left)'}"

    def reset(self, key_id: str) -> str:
        self._check_id(key_id)
        if not self._pool().reset_key(key_id):
            raise ValueError(f"no key {key_id!r}")
        return f"reset {key_id}"

    def budget(self, key_id: str, dollars: float) -> str:
        self._check_id(key_id)
        if not math.isfinite(dollars) or dollars <= 0:
            raise ValueError("budget must be a positive number of dollars")
        if not self._pool().set_fields(key_id, {"budgetLimit": float(dollars)}):
            raise ValueError(f"no key {key_id!r}")
        return f"{key_id} budget set to ${dollars:.2f}"
