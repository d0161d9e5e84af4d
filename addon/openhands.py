"""mitmproxy entry point: `mitmdump -s addon/openhands.py`. A thin table of hooks; all work is delegated."""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # run from a clone without `pip install -e .`
    sys.path.insert(0, _ROOT)

from mitmproxy import command, http  # noqa: E402

from addon.operator import contentview  # noqa: E402
from addon.operator.commands import PoolCommands  # noqa: E402
from addon.lifecycle import Sidecar  # noqa: E402


class OpenHands:
    def __init__(self) -> None:
        self.sidecar = Sidecar()
        self.commands = PoolCommands(self.sidecar)

    def load(self, loader) -> None:
        contentview.register()
        self.sidecar.load(loader)

    def configure(self, updated: set[str]) -> None:
        self.sidecar.configure(updated)

    def running(self) -> None:
        self.sidecar.running()

    def done(self) -> None:
        self.commands.close()
        self.sidecar.done()
        contentview.unregister()

    async def request(self, flow: http.HTTPFlow) -> None:
        await self.sidecar.request(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.sidecar.responseheaders(flow)

    async def response(self, flow: http.HTTPFlow) -> None:
        await self.sidecar.response(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.sidecar.error(flow)

    @command.command("openhands.keys")
    def keys(self) -> str:
        """Table of pool keys with spend and status."""
        return self.commands.keys()

    @command.command("openhands.add")
    def add(self, key_id: str, api_key: str) -> str:
        """Add a key to the pool ($10 budget unless configured otherwise)."""
        return self.commands.add(key_id, api_key)

    @command.command("openhands.backup")
    def backup(self, key_id: str, api_key: str) -> str:
        """Add a backup key, promoted when the pool runs dry."""
        return self.commands.backup(key_id, api_key)

    @command.command("openhands.rotate")
    def rotate(self, key_id: str) -> str:
        """Retire a key now and move its clients to the next one."""
        return self.commands.rotate(key_id)

    @command.command("openhands.reset")
    def reset(self, key_id: str) -> str:
        """Healthy again with counters and spend at zero."""
        return self.commands.reset(key_id)

    @command.command("openhands.budget")
    def budget(self, key_id: str, dollars: str) -> str:
        """Set a key's budgetLimit in dollars."""
        return self.commands.budget(key_id, dollars)


addons = [OpenHands()]
