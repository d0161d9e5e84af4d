"""mitmproxy entry point: `mitmdump -s addon/openhands.py`.

Small addons composed the way mitmproxy's own `default_addons()` is; they share one `Services`, and
the script hands them to mitmproxy as one node (`addon.composite`).
Order matters: the lifecycle configures first, the admin addon answers admin paths before the
traffic addon could pool them.
"""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # run from a clone without `pip install -e .`
    sys.path.insert(0, _ROOT)

from addon.composite import compose  # noqa: E402
from addon.lifecycle import Lifecycle  # noqa: E402
from addon.operator.admin_addon import AdminAddon  # noqa: E402
from addon.operator.commands_addon import CommandsAddon  # noqa: E402
from addon.operator.contentview import ContentViewAddon  # noqa: E402
from addon.operator.metrics import MetricsEndpoint  # noqa: E402
from addon.operator.observability import FlowObserver, ObservabilityRoutes  # noqa: E402
from addon.services import Services  # noqa: E402
from addon.traffic.pooled import PooledTraffic  # noqa: E402


def default_addons(services: Services | None = None) -> list[object]:
    services = services or Services()
    metrics = MetricsEndpoint(services)  # /metrics before the admin addon; the flow observer after traffic
    return [
        Lifecycle(services),
        ObservabilityRoutes(services, metrics),
        AdminAddon(services),
        PooledTraffic(services, metrics=metrics.metrics),
        FlowObserver(services, metrics.metrics),
        CommandsAddon(services, metrics=metrics.metrics),
        ContentViewAddon(),
    ]


# mitmproxy sees them as one node of its addon tree (addon.composite: it walks the tree on every event).
addons = [compose(default_addons())]
