"""Regenerate pricing/prices.json from LiteLLM's model price database plus pricing/overrides.json.

Usage: python pricing/generate_prices.py --litellm-json PATH [--out pricing/prices.json]

The selection of models (what the OpenHands provider serves) lives here; the numbers come from the
LiteLLM JSON, or, for models that LiteLLM version lacks, from overrides.json (each entry cites its
source). Output is deterministic: same inputs, same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script from anywhere

from pricing.table import ModelPrice, price_from_litellm  # noqa: E402

# (canonical name, LiteLLM keys to try in order, extra aliases). Dated names resolve to the
# undated canonical name by date-stripping in PriceTable.lookup, so they need no alias here.
MODELS: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    # Claude
    ("claude-opus-4-5", ("claude-opus-4-5-20251101", "claude-opus-4-5"), ()),
    ("claude-opus-4-6", ("claude-opus-4-6",), ()),
    ("claude-opus-4-7", ("claude-opus-4-7",), ()),
    ("claude-opus-4-8", ("claude-opus-4-8",), ()),
    ("claude-opus-5", ("claude-opus-5",), ()),
    ("claude-fable-5", ("claude-fable-5",), ()),
    ("claude-sonnet-5", ("claude-sonnet-5",), ()),
    ("claude-sonnet-4-6", ("claude-sonnet-4-6",), ()),
    ("claude-sonnet-4-5", ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"), ()),
    ("claude-sonnet-4", ("claude-sonnet-4-20250514",), ()),
    ("claude-haiku-4-5", ("claude-haiku-4-5-20251001", "claude-haiku-4-5"), ()),
    ("claude-opus-4-1", ("claude-opus-4-1-20250805", "claude-opus-4-1"), ()),
    ("claude-opus-4", ("claude-opus-4-20250514",), ()),
    # GPT
    ("gpt-5", ("gpt-5-2025-08-07", "gpt-5"), ()),
    ("gpt-5-mini", ("gpt-5-mini-2025-08-07", "gpt-5-mini"), ()),
    ("gpt-5-codex", ("gpt-5-codex",), ()),
    ("gpt-5.1", ("gpt-5.1",), ()),
    ("gpt-5.1-codex", ("gpt-5.1-codex",), ()),
    ("gpt-5.1-codex-max", ("gpt-5.1-codex-max",), ()),
    ("gpt-5.2", ("gpt-5.2",), ()),
    ("gpt-5.2-codex", ("gpt-5.2-codex",), ()),
    ("gpt-5.4", ("gpt-5.4",), ()),
    ("gpt-5.5", ("gpt-5.5",), ()),
    ("gpt-5.6", ("gpt-5.6",), ()),
    ("o3", ("o3",), ()),
    ("o4-mini", ("o4-mini",), ()),
    ("codex-mini-latest", ("codex-mini-latest",), ()),
    # Gemini (the OpenHands docs' gemini-2.5-pro price is the Vertex entry: cache read 0.125)
    ("gemini-2.5-pro", ("gemini-2.5-pro",), ()),
    ("gemini-3-pro-preview", ("gemini-3-pro-preview", "gemini/gemini-3-pro-preview"), ("gemini-3-pro",)),
    ("gemini-3.1-pro-preview", ("gemini-3.1-pro-preview", "gemini/gemini-3.1-pro-preview"), ("gemini-3.1-pro",)),
    ("gemini-3-flash-preview", ("gemini-3-flash-preview", "gemini/gemini-3-flash-preview"), ("gemini-3-flash",)),
    # Qwen (OpenHands docs: $0.40/$1.60 = the deepinfra entry)
    ("qwen3-coder-480b", ("deepinfra/Qwen/Qwen3-Coder-480B-A35B-Instruct",), ("qwen3-coder-480b-a35b-instruct",)),
    ("qwen3-coder-next", (), ()),
    # Kimi
    ("kimi-k2-0711-preview", ("moonshot/kimi-k2-0711-preview",), ("kimi-k2",)),
    ("kimi-k2-thinking", ("moonshot/kimi-k2-thinking",), ()),
    ("kimi-k2.5", ("moonshot/kimi-k2.5",), ()),
    ("kimi-k2.6", ("moonshot/kimi-k2.6",), ()),
    ("kimi-k3", ("moonshot/kimi-k3",), ()),
    # GLM
    ("glm-4.6", ("zai/glm-4.6",), ()),
    ("glm-4.7", ("zai/glm-4.7",), ()),
    ("glm-5", ("zai/glm-5",), ()),
    ("glm-5.1", ("zai/glm-5.1",), ()),
    ("glm-5.2", ("zai/glm-5.2",), ()),
    # Devstral
    ("devstral-small-2505", ("mistral/devstral-small-2505",), ()),
    ("devstral-small-2507", ("mistral/devstral-small-2507",), ()),
    ("devstral-medium-2507", ("mistral/devstral-medium-2507",), ()),
    ("devstral-2512", ("mistral/devstral-2512",), ()),
    ("devstral-medium-2512", ("mistral/devstral-medium-2512",), ()),
    # DeepSeek (the provider-prefixed keys are what LiteLLM's deepseek provider bills with)
    ("deepseek-chat", ("deepseek/deepseek-chat",), ()),
    ("deepseek-reasoner", ("deepseek/deepseek-reasoner",), ()),
    # MiniMax
    ("minimax-m2.1", ("minimax/MiniMax-M2.1",), ()),
    ("minimax-m2.5", ("minimax/MiniMax-M2.5",), ()),
    ("minimax-m3", ("minimax/MiniMax-M3",), ()),
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _provider_of(key: str, info: dict[str, Any]) -> str:
    provider = info.get("litellm_provider")
    if isinstance(provider, str):
        return provider
    return key.split("/", 1)[0] if "/" in key else ""


def _litellm_version(litellm_json: Path) -> str:
    """Version of the wheel the JSON sits in (dist-info next to the package), else 'unknown'."""
    site = litellm_json.resolve().parent.parent
    versions = sorted(p.name[len("litellm-"):-len(".dist-info")] for p in site.glob("litellm-*.dist-info"))
    return versions[-1] if len(versions) == 1 else "unknown"


def build(litellm_json: Path, overrides_path: Path, litellm_version: str | None = None) -> dict[str, Any]:
    db: dict[str, Any] = json.loads(litellm_json.read_text(encoding="utf-8"))
    overrides: dict[str, Any] = json.loads(overrides_path.read_text(encoding="utf-8"))["models"]
    models: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    missing: list[str] = []
    for name, keys, extra_aliases in MODELS:
        entry: dict[str, Any] | None = None
        for key in keys:
            info = db.get(key)
            if not isinstance(info, dict):
                continue
            price = price_from_litellm(info, _provider_of(key, info))
            if price is None:
                continue
            entry = price.to_json() | {
                "litellm_key": key,
                "provider": _provider_of(key, info),
                "source": f"LiteLLM {litellm_version or _litellm_version(litellm_json)} JSON: {key}",
            }
            break
        if entry is None and name in overrides:
            ov = overrides[name]
            # Listed rates use the cache-aware formula; with no listed cache price there is no known
            # discount, so every prompt token is billed at the input rate (as LiteLLM's flat branch does).
            flat = "cache_read" not in ov
            entry = ModelPrice.from_json(ov | {"flat_prompt": flat}).to_json() | {
                "litellm_key": None,
                "provider": ov["provider"],
                "source": ov["source"],
            }
        if entry is None:
            missing.append(name)
            continue
        models[name] = entry
        for alias in extra_aliases:
            aliases[alias] = name
    if missing:
        raise SystemExit(f"no price for {', '.join(missing)}: add them to {overrides_path}")
    return {
        "_meta": {
            "generated_by": "pricing/generate_prices.py",
            "litellm_version": litellm_version or _litellm_version(litellm_json),
            "source_file": litellm_json.name,
            "source_sha256": _sha256(litellm_json),
            "overrides_sha256": _sha256(overrides_path),
            "units": "USD per 1M tokens",
        },
        "aliases": aliases,
        "models": models,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--litellm-json", required=True, type=Path,
                        help="litellm/model_prices_and_context_window_backup.json from the pinned wheel")
    parser.add_argument("--out", type=Path, default=HERE / "prices.json")
    parser.add_argument("--overrides", type=Path, default=HERE / "overrides.json")
    parser.add_argument("--litellm-version", default=None,
                        help="recorded in _meta; default: read from the dist-info beside the JSON")
    args = parser.parse_args(argv)
    table = build(args.litellm_json, args.overrides, args.litellm_version)
    text = json.dumps(table, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(table['models'])} models to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
