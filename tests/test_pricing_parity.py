"""Our cost equals the pinned LiteLLM's own `completion_cost` (what the proxy bills) for every bundled model
it knows."""
from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

import pytest

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before importing litellm: no network fetch of prices
litellm = pytest.importorskip("litellm", reason="litellm (test extra, pinned 1.80.0) is not installed")
from litellm.types.utils import ModelResponse, Usage  # noqa: E402

from pricing.cost import cost_usd  # noqa: E402
from pricing.table import PriceTable  # noqa: E402
from pricing.tokens import TokenCounts  # noqa: E402

TABLE = PriceTable.load_bundled()
RAW = json.loads((Path(__file__).resolve().parent.parent / "pricing" / "prices.json").read_text())
KNOWN = sorted((name, entry["litellm_key"]) for name, entry in RAW["models"].items() if entry["litellm_key"])


def _usages(threshold: int | None) -> list[TokenCounts]:
    """Cache-heavy usages below, exactly at and just above `threshold` (or a 200k default)."""
    t = threshold or 200_000
    cases = [
        TokenCounts(input=12, cache_write=1500, cache_read=30_000, output=25),
        TokenCounts(input=1500, cache_write=0, cache_read=30_000, output=300, reasoning=120),
        TokenCounts(input=700, cache_write=400, cache_write_1h=900, cache_read=5000, output=1000),
    ]
    for prompt in (t, t + 1):  # at the threshold (base rates), one above (tier rates)
        cases.append(
            TokenCounts(input=prompt - 150_000 - 3000 - 1000, cache_write=3000, cache_write_1h=1000,
                        cache_read=150_000, output=2000)
        )
        cases.append(TokenCounts(input=prompt - 4000, cache_read=4000, output=777))
    return cases


def _litellm_cost(key: str, tokens: TokenCounts) -> float:
    usage = Usage(
        prompt_tokens=tokens.prompt_total,
        completion_tokens=tokens.output,
        total_tokens=tokens.total,
        prompt_tokens_details={
            "cached_tokens": tokens.cache_read,
            "cache_creation_tokens": tokens.cache_write + tokens.cache_write_1h,
            "cache_creation_token_details": {
                "ephemeral_5m_input_tokens": tokens.cache_write,
                "ephemeral_1h_input_tokens": tokens.cache_write_1h,
            },
        },
    )
    response = ModelResponse(model=key, usage=usage)
    return litellm.completion_cost(completion_response=response, model=key)


CASES = [
    pytest.param(name, key, tokens, id=f"{name}-{i}")
    for name, key in KNOWN
    for i, tokens in enumerate(_usages(min((t.above for t in TABLE.models[name].tiers), default=None)))
]


def test_pinned_litellm_knows_the_core_models() -> None:
    """Guards against a regenerated table silently moving everything to overrides (parity would test nothing)."""
    assert RAW["_meta"]["litellm_version"] == metadata.version("litellm"), "regenerate pricing/prices.json"
    assert len(KNOWN) >= 20
    assert {"claude-sonnet-4-5", "gpt-5-mini", "gemini-2.5-pro", "kimi-k2-thinking", "deepseek-chat"} <= {
        n for n, _ in KNOWN
    }


@pytest.mark.parametrize(("name", "key", "tokens"), CASES)
def test_cost_matches_litellm(name: str, key: str, tokens: TokenCounts) -> None:
    ours = cost_usd(TABLE.lookup(name), tokens)
    theirs = _litellm_cost(key, tokens)
    assert ours == pytest.approx(theirs, abs=1e-9, rel=0)
    assert theirs > 0
