"""The usual chat usage is read by a one-pass fast path: it must meter exactly as the general reader."""
from __future__ import annotations

import itertools
import random

import pytest

from addon.core import usage as usage_module
from addon.core.usage import usage_from_json


class _Body(dict):
    """A body the fast path does not take (it reads plain dicts only): the general reader's answer."""


def _general(body: dict):
    return usage_from_json("chat", _Body(body))


def _both(body: dict):
    fast, general = usage_from_json("chat", body), _general(body)
    return fast, general


FIELDS = sorted(usage_module._CHAT_USUAL) + ["cached_tokens", "cost", "cache_creation_token_details", "service_tier"]
NESTED = ["cached_tokens", "cache_creation_tokens", "reasoning_tokens", "audio_tokens", "text_tokens",
          "ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"]
VALUES = [0, 1, 12, 1500, 30000, 31500, 10**9, 10**9 + 1, -1, True, None, 3.0, float("nan"), "12", 0.0017, [1]]


def _random_usage(rng: random.Random) -> dict:
    usage: dict = {}
    for name in rng.sample(FIELDS, rng.randint(0, len(FIELDS))):
        if name.endswith("_details") and rng.random() < 0.8:
            usage[name] = {sub: rng.choice(VALUES[:8] if rng.random() < 0.8 else VALUES)
                           for sub in rng.sample(NESTED, rng.randint(0, 4))}
        else:
            usage[name] = rng.choice(VALUES[:6] if rng.random() < 0.7 else VALUES)
    return usage


@pytest.mark.parametrize("seed", range(8))
def test_the_fast_path_meters_as_the_general_reader(seed):
    """Property: any usage, usual or not, gives the same tokens, model, cost and dropped-field names."""
    rng = random.Random(seed)
    for _ in range(500):
        body = {"model": rng.choice(["gpt-5-mini", "", None, 7]), "usage": _random_usage(rng)}
        fast, general = _both(body)
        assert (fast is None) == (general is None), body
        if fast is not None and general is not None:
            assert (fast.tokens, fast.model, fast.cost, fast.rejected) == (
                general.tokens, general.model, general.cost, general.rejected), body


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 31500, "completion_tokens": 300, "total_tokens": 31800,
     "prompt_tokens_details": {"cached_tokens": 30000}},  # OpenAI
    {"completion_tokens": 25, "prompt_tokens": 31512, "total_tokens": 31537,
     "completion_tokens_details": {"reasoning_tokens": 0},
     "prompt_tokens_details": {"cached_tokens": 30000, "cache_creation_tokens": 1500},
     "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 30000},  # Anthropic through LiteLLM
    {"prompt_tokens": 10, "completion_tokens": 2, "cache_read_input_tokens": 40},  # reads over the prompt
    {"prompt_tokens": 0, "completion_tokens": 0},
])
def test_the_usual_shapes_take_the_fast_path_with_the_general_figures(usage):
    """The shapes of the reference answers are read by the fast path (not handed on) and agree with the
    general reader."""
    assert usage_module._chat_usual(usage) is not None
    fast, general = _both({"model": "m", "usage": usage})
    assert fast is not None and general is not None
    assert (fast.tokens, fast.model, fast.cost, fast.rejected) == (general.tokens, general.model, general.cost, ())


@pytest.mark.parametrize("name, value", list(itertools.product(["prompt_tokens", "total_tokens", "completion_tokens"],
                                                               [-1, 10**9 + 1, True, 1.0, None, "5"])))
def test_an_unusual_count_is_left_to_the_general_reader(name, value):
    """Anything the fast path cannot read as it is goes to the general path, which drops and names it."""
    usage = {"prompt_tokens": 31500, "completion_tokens": 300, "total_tokens": 31800, name: value}
    assert usage_module._chat_usual(usage) is None
    fast, general = _both({"model": "m", "usage": usage})
    assert (fast and (fast.tokens, fast.rejected)) == (general and (general.tokens, general.rejected))
