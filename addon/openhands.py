"""mitmproxy entry point: `mitmdump -s addon/openhands.py`.

Small addons composed the way mitmproxy's own `default_addons()` is; they share one `Services`. This
module is the one node mitmproxy sees for them (`addon.composite.handlers`): their hooks are its
attributes, and it has no `addons` attribute, so mitmproxy's walk on every event ends here.
Never import a name of a mitmproxy hook (`request`, `load`, `done`, `error`...) into this module:
mitmproxy would call it as a hook.
Order matters: the lifecycle configures first, the admin addon answers admin paths before the
traffic addon could pool them.
"""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # run from a clone without `pip install -e .`
    sys.path.insert(0, _ROOT)

from addon.composite import handlers  # noqa: E402
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
        ObservabilityRoutes(services, metrics, admin=AdminAddon(services)),  # /metrics, sign-in, admin API
        PooledTraffic(services, metrics=metrics.metrics),
        FlowObserver(services, metrics.metrics),
        CommandsAddon(services, metrics=metrics.metrics),
        ContentViewAddon(),
    ]


name = "openhands"  # mitmproxy's name for this addon (else the script's path), as the composed node was called
parts = tuple(default_addons())  # the sidecar's addons, one `Services`
# The composed hooks, as module attributes (mitmproxy calls a module's functions as an addon's hooks):
# `load` (options, and the parts' commands), `configure`, `running`, `request`, `responseheaders`, ...
globals().update(handlers(parts))
