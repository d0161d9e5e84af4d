"""From a response to dollars: the cost rule of DESIGN §6 around the pure pricing core.

Bounded (issue: trust boundary): upstream numbers are untrusted. A response cost that is
non-finite, negative or over $1,000, and token counts over 10^9 (10**400 would overflow a float),
are dropped with one warning per key, never an exception: one hostile answer must neither crash
the response hook nor move a key's spend to $1e308.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

from addon.core.usage import MAX_COST, Usage
from pricing.cost import cost_usd, fallback_price
from pricing.table import ModelPrice, PriceTable

log = logging.getLogger(__name__)

MAX_CACHED_MODELS = 1024  # model names whose price look-up is remembered, per price table


def parse_money(value: str | bytes | None) -> float | None:
    """A finite, non-negative dollar amount from a header, or None."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def plausible_cost(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and 0 <= value <= MAX_COST


@dataclass(slots=True)
class Charge:  # a return value, never shared (not frozen: a frozen dataclass costs ~4x as much to build)
    cost: float
    source: str  # "header" | "usage.cost" | "table" | "fallback" | "none" | "dropped"
    model: str | None
    tokens: int


class Meter:
    """Holds the current price table (bundled, then the upstream's /v1/model/info)."""

    def __init__(self, table: PriceTable, fallback: tuple[float, float]) -> None:
        self.table = table
        self.fallback = fallback
        self._warned: set[str] = set()
        self._warned_keys: set[str] = set()
        self._lock = threading.Lock()
        # model -> the table's price for it, for one table (read and replaced as one tuple: a thread that
        # swapped tables never files a price of the old table under the new one)
        self._prices: tuple[PriceTable | None, dict[str, ModelPrice | None]] = (None, {})
        self._fallback_price: tuple[tuple[float, float] | None, ModelPrice | None] = (None, None)

    def use_model_info(self, payload: dict) -> None:
        self.table = self.table.with_model_info(payload)

    def charge(self, usage: Usage | None, header_cost: str | None, request_model: str | None = None,
               key_id: str | None = None) -> Charge:
        """First that applies: x-litellm-response-cost, usage.cost, the price table, the fallback. Never raises."""
        try:
            return self._charge(usage, header_cost, request_model, key_id)
        except (OverflowError, ValueError, TypeError, ArithmeticError) as e:
            self._warn_key(key_id, f"metering failed on this answer ({e.__class__.__name__}); not charged")
            return Charge(0.0, "dropped", request_model, 0)

    def _charge(self, usage: Usage | None, header_cost: str | None, request_model: str | None,
                key_id: str | None) -> Charge:
        if usage is not None:
            model = usage.model or request_model
            tokens = usage.tokens.total
            if usage.rejected:
                self._warn_key(key_id, f"dropped implausible usage field(s) {', '.join(usage.rejected)}")
        else:
            model, tokens = request_model, 0
        if header_cost is not None:
            from_header = parse_money(header_cost)
            if from_header is None:
                if str(header_cost).strip():
                    self._warn_key(key_id, f"ignored x-litellm-response-cost {str(header_cost)[:40]!r} (not a "
                                           "finite, non-negative number)")
            elif not plausible_cost(from_header):
                self._warn_key(key_id, f"dropped x-litellm-response-cost ${from_header:.6g} (over ${MAX_COST:g} for "
                                       "one response)")
            else:
                return Charge(from_header, "header", model, tokens)
        if usage is None:
            return Charge(0.0, "none", model, 0)
        if usage.cost is not None:
            return Charge(usage.cost, "usage.cost", model, tokens)
        price = self._price(model) if model else None
        if price is not None:
            return self._bounded(Charge(cost_usd(price, usage.tokens), "table", model, tokens), key_id)
        self._warn_once(model or "<no model>")
        fallback = self.fallback
        cached = self._fallback_price
        if cached[0] != fallback or cached[1] is None:
            cached = self._fallback_price = (fallback, fallback_price(*fallback))
        assert cached[1] is not None
        return self._bounded(Charge(cost_usd(cached[1], usage.tokens), "fallback", model, tokens), key_id)

    def _price(self, model: str) -> ModelPrice | None:
        """`self.table.lookup(model)`, remembered per table (a table never changes: a new one replaces it;
        the name rules behind a look-up cost more than the arithmetic of the charge)."""
        table = self.table
        cached = self._prices
        if cached[0] is not table:
            cached = self._prices = (table, {})
        prices = cached[1]
        try:
            return prices[model]
        except KeyError:
            pass
        price = table.lookup(model)
        if len(prices) < MAX_CACHED_MODELS:  # clients choose model names: bounded, odd names are looked up each time
            prices[model] = price
        return price

    def _bounded(self, charge: Charge, key_id: str | None) -> Charge:
        if plausible_cost(charge.cost):
            return charge
        self._warn_key(key_id, f"dropped a computed cost of ${charge.cost:.6g} for one response")
        return Charge(0.0, "dropped", charge.model, 0)

    def _warn_key(self, key_id: str | None, what: str) -> None:
        name = key_id or "<unknown key>"
        with self._lock:
            if name in self._warned_keys:
                return
            self._warned_keys.add(name)
        log.warning("💲 [OpenHands/Metering] key %s: %s (warned once per key)", name, what)

    def _warn_once(self, model: str) -> None:
        with self._lock:
            if model in self._warned:
                return
            self._warned.add(model)
        log.warning("💲 [OpenHands/Metering] no price for model %r; using the fallback $%g/$%g per 1M tokens",
                    model, *self.fallback)
