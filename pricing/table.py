"""Model price table: the bundled `prices.json`, optionally overlaid with the upstream's own prices.

All rates are USD per 1M tokens. Reading the bundled JSON file is the only I/O in this module.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

BUNDLED_PATH = Path(__file__).with_name("prices.json")

# Providers whose LiteLLM 1.80 cost function is cache-aware (`generic_cost_per_token`, see
# `cost_calculator.cost_per_token`). Every other provider (moonshot, mistral, deepinfra, zai,
# minimax, …) falls through to LiteLLM's flat branch: `prompt_tokens × input + completion × output`,
# so cached tokens are billed at the full input rate and tiers are ignored.
CACHE_AWARE_PROVIDERS = frozenset(
    {
        "anthropic", "openai", "gemini", "vertex_ai", "deepseek", "bedrock", "bedrock_converse",
        "azure", "databricks", "fireworks_ai", "perplexity", "xai", "lemonade", "dashscope",
    }
)

_WRAPPER_PREFIXES = ("openhands/", "litellm_proxy/")
_DATE_SUFFIX = re.compile(r"(?:[-@]\d{8}|-\d{4}-\d{2}-\d{2})$")
_TIER_KEY = re.compile(
    r"^(input_cost_per_token|output_cost_per_token|cache_creation_input_token_cost"
    r"|cache_read_input_token_cost)_above_(\d+(?:\.\d+)?)(k?)_tokens$"
)
_TIER_FIELD = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_creation_input_token_cost": "cache_write",
    "cache_read_input_token_cost": "cache_read",
}
_PER_1M = 1_000_000


@dataclass(frozen=True)
class PriceTier:
    """Rates that replace the base rates for the whole request once prompt tokens exceed `above`.

    A rate left as None keeps the base rate (LiteLLM only switches the keys a tier defines).
    """

    above: int
    input: float | None = None
    output: float | None = None
    cache_write: float | None = None
    cache_read: float | None = None


@dataclass(frozen=True)
class ModelPrice:
    """Per-1M-token rates of one model.

    A missing cache rate is 0.0, as in LiteLLM (which bills an unpriced bucket at $0).
    `cache_write_1h` None means "absent": LiteLLM then bills 1h cache writes at $0.
    `flat_prompt` mirrors LiteLLM 1.80's non-cache-aware providers: every prompt token at `input`.
    """

    input: float
    output: float
    cache_write: float = 0.0
    cache_read: float = 0.0
    cache_write_1h: float | None = None
    tiers: tuple[PriceTier, ...] = ()
    flat_prompt: bool = False

    def tier_for(self, prompt_tokens: int) -> PriceTier | None:
        """Highest tier whose threshold `prompt_tokens` strictly exceeds (LiteLLM uses `>`)."""
        best: PriceTier | None = None
        for tier in self.tiers:
            if prompt_tokens > tier.above and (best is None or tier.above > best.above):
                best = tier
        return best

    def to_json(self) -> dict[str, Any]:
        tiers = [
            {k: v for k, v in vars(t).items() if v is not None} for t in sorted(self.tiers, key=lambda t: t.above)
        ]
        return {
            "input": self.input,
            "output": self.output,
            "cache_write": self.cache_write,
            "cache_write_1h": self.cache_write_1h,
            "cache_read": self.cache_read,
            "tiers": tiers,
            "flat_prompt": self.flat_prompt,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelPrice:
        tiers = tuple(
            PriceTier(
                above=int(t["above"]),
                input=_opt(t.get("input")),
                output=_opt(t.get("output")),
                cache_write=_opt(t.get("cache_write")),
                cache_read=_opt(t.get("cache_read")),
            )
            for t in data.get("tiers") or ()
        )
        return cls(
            input=float(data["input"]),
            output=float(data["output"]),
            cache_write=float(data.get("cache_write") or 0.0),
            cache_read=float(data.get("cache_read") or 0.0),
            cache_write_1h=_opt(data.get("cache_write_1h")),
            tiers=tiers,
            flat_prompt=bool(data.get("flat_prompt", False)),
        )


def _opt(value: Any) -> float | None:
    return None if value is None else float(value)


def _number(value: Any) -> float | None:
    """A finite, non-negative cost, or None for anything LiteLLM or a sane operator would not bill."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value)  # LiteLLM accepts "3e-7" from config.yaml
        except ValueError:
            return None
    else:
        return None
    return result if math.isfinite(result) and result >= 0 else None


def _per_1m(per_token: float) -> float:
    """Per-token → per-1M, rounded to 12 significant digits so 3e-06 reads as 3.0, not 3.0000000000000004."""
    return float(f"{per_token * _PER_1M:.12g}")


def provider_is_flat(provider: str | None) -> bool:
    """True when LiteLLM 1.80 prices this provider without cache awareness (see CACHE_AWARE_PROVIDERS)."""
    if not provider:
        return False
    # "vertex_ai-language-models" → "vertex_ai"
    return provider.split("-")[0].lower() not in CACHE_AWARE_PROVIDERS


def price_from_litellm(info: Mapping[str, Any], provider: str | None = None) -> ModelPrice | None:
    """ModelPrice from a LiteLLM model-info dict (per-token costs), or None if input/output are unusable."""
    inp = _number(info.get("input_cost_per_token"))
    out = _number(info.get("output_cost_per_token"))
    if inp is None or out is None:
        return None
    cw = _number(info.get("cache_creation_input_token_cost"))
    cr = _number(info.get("cache_read_input_token_cost"))
    cw1h = _number(info.get("cache_creation_input_token_cost_above_1hr"))
    tier_rates: dict[int, dict[str, float]] = {}
    for key, raw in info.items():
        match = _TIER_KEY.match(key)
        value = _number(raw)
        if match is None or value is None:
            continue
        above = int(float(match.group(2)) * (1000 if match.group(3) else 1))
        tier_rates.setdefault(above, {})[_TIER_FIELD[match.group(1)]] = _per_1m(value)
    # LiteLLM only recognises a tier through its input key; the other tier keys ride along.
    tiers = tuple(
        PriceTier(above=above, **rates) for above, rates in sorted(tier_rates.items()) if "input" in rates
    )
    return ModelPrice(
        input=_per_1m(inp),
        output=_per_1m(out),
        cache_write=_per_1m(cw) if cw is not None else 0.0,
        cache_read=_per_1m(cr) if cr is not None else 0.0,
        cache_write_1h=_per_1m(cw1h) if cw1h is not None else None,
        tiers=tiers,
        flat_prompt=provider_is_flat(provider if provider is not None else info.get("litellm_provider")),
    )


def normalise(model: str) -> str:
    return model.strip().lower()


def _candidates(model: str) -> Iterator[str]:
    """Names to try, most specific first: wrappers removed, then each leading provider segment dropped."""
    name = normalise(model)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                stripped = True
    while True:
        yield name
        undated = _DATE_SUFFIX.sub("", name)
        if undated != name:
            yield undated
        if "/" not in name:
            return
        name = name.split("/", 1)[1]


@dataclass(frozen=True)
class PriceTable:
    """Immutable name → price map; `with_model_info` returns a new table instead of mutating."""

    models: Mapping[str, ModelPrice]
    aliases: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return cls.from_json(data)

    @classmethod
    def load_bundled(cls) -> PriceTable:
        return cls.load(BUNDLED_PATH)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PriceTable:
        models = {normalise(name): ModelPrice.from_json(entry) for name, entry in data["models"].items()}
        aliases = {normalise(a): normalise(t) for a, t in (data.get("aliases") or {}).items()}
        return cls(models=models, aliases=aliases, meta=dict(data.get("_meta") or {}))

    def lookup(self, model: str) -> ModelPrice | None:
        """Price for a client-sent model name, tolerant of prefixes, case, dates and aliases."""
        for name in _candidates(model):
            if name in self.models:
                return self.models[name]
            target = self.aliases.get(name)
            if target is not None and target in self.models:
                return self.models[target]
        return None

    def with_model_info(self, payload: Any) -> PriceTable:
        """Overlay the upstream's `GET /v1/model/info` prices; malformed entries are skipped."""
        data = payload.get("data") if isinstance(payload, Mapping) else None
        if not isinstance(data, list):
            return self
        primary: dict[str, ModelPrice] = {}
        secondary: dict[str, ModelPrice] = {}
        for entry in data:
            if not isinstance(entry, Mapping):
                continue
            info = entry.get("model_info")
            params = entry.get("litellm_params")
            if not isinstance(info, Mapping):
                continue
            deployed = params.get("model") if isinstance(params, Mapping) else None
            deployed = deployed if isinstance(deployed, str) else None
            provider = info.get("litellm_provider")
            if not isinstance(provider, str) and deployed and "/" in deployed:
                provider = deployed.split("/", 1)[0]
            price = price_from_litellm(info, provider if isinstance(provider, str) else None)
            if price is None:
                continue
            name = entry.get("model_name")
            if isinstance(name, str) and name.strip():
                key = _canonical(name)
                primary[key] = price
                # A dated upstream name also prices its undated alias (unless named on its own).
                secondary.setdefault(_DATE_SUFFIX.sub("", key), price)
            if deployed:
                secondary.setdefault(_canonical(deployed), price)
        if not primary and not secondary:
            return self
        models = dict(self.models)
        models.update({k: v for k, v in secondary.items() if k not in primary})
        models.update(primary)
        # An upstream name must win over a bundled alias pointing elsewhere.
        aliases = {a: t for a, t in self.aliases.items() if a not in primary and a not in secondary}
        return replace(self, models=models, aliases=aliases)


def _canonical(model: str) -> str:
    """Key for an upstream name: wrappers and provider segments removed, date kept."""
    name = normalise(model)
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.rsplit("/", 1)[-1]
