"""Dollar cost of one response, computed the way LiteLLM 1.80 bills it (reference §4)."""
from __future__ import annotations

from pricing.table import ModelPrice
from pricing.tokens import TokenCounts

_PER_1M = 1_000_000


def cost_usd(price: ModelPrice, tokens: TokenCounts) -> float:
    """USD for `tokens` at `price`; a tier above its threshold replaces the rates it defines for the whole request."""
    if price.flat_prompt:
        # LiteLLM's non-cache-aware providers: every prompt token at the input rate, no tiers.
        return (tokens.prompt_total * price.input + tokens.output * price.output) / _PER_1M

    input_rate, output_rate = price.input, price.output
    write_rate, read_rate = price.cache_write, price.cache_read
    tier = price.tier_for(tokens.prompt_total) if price.tiers else None  # (most models have no tiers)
    if tier is not None:
        input_rate = tier.input if tier.input is not None else input_rate
        output_rate = tier.output if tier.output is not None else output_rate
        write_rate = tier.cache_write if tier.cache_write is not None else write_rate
        read_rate = tier.cache_read if tier.cache_read is not None else read_rate
    # LiteLLM never tiers the 1h write rate, and bills 1h writes at $0 when the model has no such rate.
    write_1h_rate = price.cache_write_1h if price.cache_write_1h is not None else 0.0

    dollars_x_1m = (
        tokens.input * input_rate
        + tokens.cache_write * write_rate
        + tokens.cache_write_1h * write_1h_rate
        + tokens.cache_read * read_rate
        + tokens.output * output_rate
    )
    return dollars_x_1m / _PER_1M


def fallback_price(input_per_1m: float, output_per_1m: float) -> ModelPrice:
    """Price for a model nobody priced: all prompt tokens (cached too) at the input rate, so the estimate errs high."""
    return ModelPrice(input=float(input_per_1m), output=float(output_per_1m), flat_prompt=True)
