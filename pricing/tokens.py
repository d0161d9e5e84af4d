"""Token counts normalised across wire formats, so pricing never needs to know the format."""
from __future__ import annotations

from typing import Any


class TokenCounts:
    """Billable token buckets of one response.

    `input` is uncached input only (billed at the input rate); cache writes and reads are separate
    buckets; `output` includes reasoning tokens (LiteLLM bills them at the output rate).

    A value object, built once per metered response: a plain class with slots (what a frozen dataclass
    offers, equality, hash, repr, without its per-field `object.__setattr__` on every build and with
    faster field reads). Never assign to a field: build a new one.
    """

    __slots__ = ("input", "cache_write", "cache_write_1h", "cache_read", "output", "reasoning")

    input: int
    cache_write: int
    cache_write_1h: int
    cache_read: int
    output: int
    reasoning: int  # informational: already inside `output`

    def __init__(self, input: int = 0, cache_write: int = 0, cache_write_1h: int = 0, cache_read: int = 0,
                 output: int = 0, reasoning: int = 0) -> None:
        self.input = input
        self.cache_write = cache_write
        self.cache_write_1h = cache_write_1h
        self.cache_read = cache_read
        self.output = output
        self.reasoning = reasoning

    def _fields(self) -> tuple[int, int, int, int, int, int]:
        return (self.input, self.cache_write, self.cache_write_1h, self.cache_read, self.output, self.reasoning)

    def __eq__(self, other: Any) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (f"TokenCounts(input={self.input!r}, cache_write={self.cache_write!r}, "
                f"cache_write_1h={self.cache_write_1h!r}, cache_read={self.cache_read!r}, output={self.output!r}, "
                f"reasoning={self.reasoning!r})")

    @property
    def prompt_total(self) -> int:
        """Prompt tokens as LiteLLM counts them for tier thresholds (cache included)."""
        return self.input + self.cache_write + self.cache_write_1h + self.cache_read

    @property
    def total(self) -> int:
        return self.prompt_total + self.output
