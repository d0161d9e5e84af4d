"""Commands addon: the `openhands.*` command table; the work is in `PoolCommands`."""
from __future__ import annotations

from mitmproxy import command

from addon.core.counters import Metrics
from addon.operator.commands import PoolCommands
from addon.services import Services


class CommandsAddon:
    def __init__(self, services: Services, metrics: Metrics | None = None) -> None:
        self.commands = PoolCommands(services)
        self.metrics = metrics or Metrics()  # admin rotations, for GET /metrics

    def done(self) -> None:
        self.commands.close()

    @command.command("openhands.keys")
    def keys(self) -> str:
        """Table of pool keys with spend and status."""
        return self.commands.keys()

    @command.command("openhands.add")
    def add(self, key_id: str, key_source: str) -> str:
        """Add a key to the pool ($10 budget unless configured otherwise). key_source: a file holding the
        key, or env:NAME; never the key itself (mitmproxy records command lines in its history)."""
        return self.commands.add(key_id, key_source)

    @command.command("openhands.backup")
    def backup(self, key_id: str, key_source: str) -> str:
        """Add a backup key, promoted when the pool runs dry. key_source: a file holding the key, or env:NAME."""
        return self.commands.backup(key_id, key_source)

    @command.command("openhands.rotate")
    def rotate(self, key_id: str) -> str:
        """Retire a key now and move its clients to the next one."""
        started = self.commands.rotate(key_id)  # raises for an unknown key: nothing counted
        self.metrics.count_rotation("admin")
        return started

    @command.command("openhands.reset")
    def reset(self, key_id: str) -> str:
        """Healthy again with counters and spend at zero."""
        return self.commands.reset(key_id)

    @command.command("openhands.budget")
    def budget(self, key_id: str, dollars: str) -> str:
        """Set a key's budgetLimit in dollars."""
        return self.commands.budget(key_id, dollars)
