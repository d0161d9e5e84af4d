"""`TokenCounts` and `Usage` are plain slotted classes (cheaper to build and read on every metered answer):
they must still behave as the frozen dataclasses they replaced, whose definitions are copied here as the
reference: equality (Usage's leaves `rejected` out), hash, repr, defaults and keywords."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from addon.core.usage import Usage
from pricing.tokens import TokenCounts


@dataclass(frozen=True)
class RefTokenCounts:
    input: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0
    output: int = 0
    reasoning: int = 0


@dataclass(frozen=True)
class RefUsage:
    tokens: RefTokenCounts
    model: str | None
    cost: float | None
    rejected: tuple[str, ...] = field(default=(), compare=False)


counts = st.tuples(*[st.integers(0, 5) for _ in range(6)])
models = st.sampled_from([None, "gpt-5-mini", "claude-sonnet-4-5"])
costs = st.sampled_from([None, 0.0, 0.25, 1e-9])
rejected = st.sampled_from([(), ("cost",), ("prompt_tokens", "cost")])


def _tokens(c: tuple[int, ...]) -> tuple[TokenCounts, RefTokenCounts]:
    return TokenCounts(*c), RefTokenCounts(*c)


@given(counts, counts)
def test_token_counts_compare_and_hash_as_the_dataclass(a: tuple[int, ...], b: tuple[int, ...]) -> None:
    (x, rx), (y, ry) = _tokens(a), _tokens(b)
    assert (x == y) == (rx == ry) and (x != y) == (rx != ry)
    assert hash(x) == hash(TokenCounts(*a))
    assert repr(x) == repr(rx).replace("RefTokenCounts", "TokenCounts")
    assert (x.total, x.prompt_total) == (sum(a[:5]), sum(a[:4]))


@given(counts, models, costs, rejected, counts, models, costs, rejected)
def test_usage_compares_as_the_dataclass(c1, m1, k1, r1, c2, m2, k2, r2) -> None:  # type: ignore[no-untyped-def]
    u1, u2 = Usage(TokenCounts(*c1), m1, k1, r1), Usage(TokenCounts(*c2), m2, k2, r2)
    ref1, ref2 = RefUsage(RefTokenCounts(*c1), m1, k1, r1), RefUsage(RefTokenCounts(*c2), m2, k2, r2)
    assert (u1 == u2) == (ref1 == ref2)
    if u1 == u2:
        assert hash(u1) == hash(u2)
    assert repr(u1) == repr(ref1).replace("RefTokenCounts", "TokenCounts").replace("RefUsage", "Usage")
    moved = u1.with_model("other")
    assert (moved.tokens, moved.model, moved.cost, moved.rejected) == (u1.tokens, "other", k1, r1)


@pytest.mark.parametrize("built, expected", [
    (TokenCounts(), (0, 0, 0, 0, 0, 0)),
    (TokenCounts(input=3, output=2), (3, 0, 0, 0, 2, 0)),
    (TokenCounts(1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 5, 6)),
    (TokenCounts(cache_write_1h=7, reasoning=1), (0, 0, 7, 0, 0, 1)),
])
def test_token_counts_defaults_and_keywords(built: TokenCounts, expected: tuple[int, ...]) -> None:
    assert (built.input, built.cache_write, built.cache_write_1h, built.cache_read, built.output,
            built.reasoning) == expected


@pytest.mark.parametrize("other", [(0, 0, 0, 0, 0, 0), None, RefTokenCounts(), "TokenCounts()"])
def test_token_counts_equal_only_token_counts(other: object) -> None:
    assert TokenCounts() != other
    assert Usage(TokenCounts(), None, None) != other


def test_no_instance_dict() -> None:
    """Slots: no per-object dict (the memory and the speed of the change)."""
    values: tuple[object, ...] = (TokenCounts(), Usage(TokenCounts(), None, None))
    for value in values:
        assert not hasattr(value, "__dict__")
        with pytest.raises(AttributeError):
            value.other = 1  # type: ignore[attr-defined]
