"""Meter: the charge of one answer follows the price table in use, the moment it changes."""
from __future__ import annotations

import pytest

from addon.core.metering import Meter
from addon.core.usage import usage_from_json
from pricing.table import PriceTable

USAGE = {"prompt_tokens": 2_000_000, "completion_tokens": 1_000_000}


def _priced(model: str, input_per_token: float, output_per_token: float) -> dict:
    return {"data": [{"model_name": model, "model_info": {"input_cost_per_token": input_per_token,
                                                           "output_cost_per_token": output_per_token,
                                                           "litellm_provider": "openai"}}]}


@pytest.mark.parametrize("model", ["house-model-x", "gpt-5-mini-2025-08-07"])
def test_a_price_refresh_changes_the_very_next_charge(model):
    """Unpriced -> priced by the upstream's model info -> repriced: each answer is charged at the table of its
    moment (a model's price is remembered per table, never across a refresh)."""
    meter = Meter(PriceTable.load_bundled(), (3.0, 15.0))
    usage = usage_from_json("chat", {"model": model, "usage": USAGE})
    first = meter.charge(usage, None, key_id="k1")
    meter.use_model_info(_priced(model, 1e-6, 2e-6))
    second = meter.charge(usage, None, key_id="k1")
    assert (second.source, second.cost) == ("table", pytest.approx(2.0 + 2.0))
    meter.use_model_info(_priced(model, 2e-6, 4e-6))
    third = meter.charge(usage, None, key_id="k1")
    assert (third.source, third.cost) == ("table", pytest.approx(4.0 + 4.0))
    assert first.cost != second.cost


def test_the_fallback_price_follows_a_changed_fallback():
    meter = Meter(PriceTable.load_bundled(), (3.0, 15.0))
    usage = usage_from_json("chat", {"model": "nobody-priced-this", "usage": USAGE})
    assert meter.charge(usage, None).cost == pytest.approx(6.0 + 15.0)
    meter.fallback = (1.0, 2.0)
    again = meter.charge(usage, None)
    assert (again.source, again.cost) == ("fallback", pytest.approx(2.0 + 2.0))
