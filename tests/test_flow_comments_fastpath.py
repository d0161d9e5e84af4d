"""The flow's usage line is built with fewer steps than its definition: it must read exactly the same."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from addon.core import flow_comments as fc


def _definition(key_id, masked_key, model, tokens, cost, key_spend, budget, cost_source=""):
    """The usage line as the README defines it, written plainly (the text mitmweb users read)."""
    t = tokens or {}
    counts = (f"in {fc._int(t.get('input'))} out {fc._int(t.get('output'))} cache r{fc._int(t.get('cache_read'))}"
              f"/w{fc._int(t.get('cache_write'))}") if t else "no usage reported"
    source = f" ({cost_source})" if cost_source in ("fallback", "none") else ""
    head = (f"🔑 {fc.display_id(key_id, masked_key)} ({masked_key or '***'}){fc.SEP}"
            f"{fc._clean(model or '?', 60)}{fc.SEP}")
    line = f"{head}{counts}{fc.SEP}{fc.money(cost)}{source}"
    if key_spend is not None:
        line += f"{fc.SEP}key ${fc._num(key_spend):.4f}" + (f"/${fc._num(budget):.2f}" if budget else "")
    return line


COSTS = [0.0, 0.0017, 0.00999999, 0.01, 0.5, 0.99995, 1.0, 12.345, 999.999, -0.5, math.nan, math.inf, -math.inf,
         0, 3, True, None, "1", 1e-12, 5e-7]
SPENDS = [None, 0.0, 1.2345, 0, 7, math.nan, math.inf, -2.0, 123456.78901, "x"]
BUDGETS = [None, 0.0, 10.0, 10, 2.5, math.nan, math.inf, 1e6]
TOKENS = [None, {}, {"input": 1500, "output": 300, "cache_read": 30000, "cache_write": 0},
          {"input": -1, "output": 2.0, "cache_read": True, "cache_write": None}, {"input": 2**60, "output": "3"},
          {"input": math.nan, "output": math.inf, "cache_read": 1e30, "cache_write": -1e30}]
SOURCES = ["", "table", "header", "fallback", "none", "usage.cost"]


@pytest.mark.parametrize("cost, key_spend, budget", list(itertools.product(COSTS, SPENDS, BUDGETS)))
def test_the_usage_line_reads_as_its_definition(cost, key_spend, budget):
    for tokens, source in zip(TOKENS, SOURCES, strict=True):
        args = ("team-a", "sk-abcde...wxyz", "gpt-5-mini", tokens, cost, key_spend, budget, source)
        assert fc.usage_line(*args) == _definition(*args)


def test_random_usage_lines_read_as_their_definition():
    """Property: random figures, ids and models (unprintable, long, the key itself as its id) read the same."""
    rng = random.Random(13)
    ids = ["k1", "sk-abcde1234567890wxyz", "a\nb", "x" * 80, "", None]
    models = [None, "", "claude-sonnet-4-5", "m\x00" * 40, 7]
    for _ in range(3000):
        cost = rng.choice([rng.random() * 10 ** rng.randint(-9, 3), rng.choice(COSTS)])
        spend = rng.choice([rng.random() * 10 ** rng.randint(-3, 6), rng.choice(SPENDS)])
        args = (rng.choice(ids), rng.choice(["sk-abcde...wxyz", "", "***"]), rng.choice(models),
                rng.choice(TOKENS), cost, spend, rng.choice(BUDGETS), rng.choice(SOURCES))
        assert fc.usage_line(*args) == _definition(*args), args
