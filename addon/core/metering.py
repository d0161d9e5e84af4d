"""From a response to dollars: the cost rule of DESIGN §6 around the pure pricing core."""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

from addon.core.usage import Usage
from pricing.cost import cost_usd, fallback_price
from pricing.table import PriceTable

log = logging.getLogger(__name__)


def parse_money(value: str | bytes | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


@dataclass(frozen=True)
class Charge:
    cost: float
    source: str  # "header" | "usage.cost" | "table" | "fallback" | "none"
    model: str | None
    tokens: int


class Meter:
    """Holds the current price table (bundled, then the upstream's /v1/model/info)."""

    def __init__(self, table: PriceTable, fallback: tuple[float, float]) -> None:
        self.table = table
        self.fallback = fallback
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def use_model_info(self, payload: dict) -> None:
        self.table = self.table.with_model_info(payload)

    def charge(self, usage: Usage | None, header_cost: str | None, request_model: str | None = None) -> Charge:
        """First that applies: x-litellm-response-cost, usage.cost, the price table, the fallback."""
        model = (usage.model if usage and usage.model else None) or request_model
        tokens = usage.tokens.total if usage else 0
        from_header = parse_money(header_cost)
        if from_header is not None:
            return Charge(from_header, "header", model, tokens)
        if usage is None:
            return Charge(0.0, "none", model, 0)
        if usage.cost is not None:
            return Charge(usage.cost, "usage.cost", model, tokens)
        price = self.table.lookup(model) if model else None
        if price is not None:
            return Charge(cost_usd(price, usage.tokens), "table", model, tokens)
        self._warn_once(model or "<no model>")
        return Charge(cost_usd(fallback_price(*self.fallback), usage.tokens), "fallback", model, tokens)

    def _warn_once(self, model: str) -> None:
        with self._lock:
            if model in self._warned:
                return
            self._warned.add(model)
        log.warning("💲 [OpenHands/Metering] no price for model %r; using the fallback $%g/$%g per 1M tokens",
                    model, *self.fallback)
