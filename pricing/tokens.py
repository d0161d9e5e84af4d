"""Token counts normalised across wire formats, so pricing never needs to know the format."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, unsafe_hash=True)
class TokenCounts:
    """Billable token buckets of one response.

    `input` is uncached input only (billed at the input rate); cache writes and reads are separate
    buckets; `output` includes reasoning tokens (LiteLLM bills them at the output rate).

    A value object, built once per metered response: equality, hash and repr as a frozen dataclass's, with
    slots and without frozen's per-field `object.__setattr__` on every build. Never assign to a field:
    build a new one.
    """

    input: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0
    output: int = 0
    reasoning: int = 0  # informational: already inside `output`

    @property
    def prompt_total(self) -> int:
        """Prompt tokens as LiteLLM counts them for tier thresholds (cache included)."""
        return self.input + self.cache_write + self.cache_write_1h + self.cache_read

    @property
    def total(self) -> int:
        return self.prompt_total + self.output
