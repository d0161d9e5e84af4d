"""Dollar amounts a user would see on their budget, worked out by hand (rates in USD per 1M tokens)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pricing import generate_prices
from pricing.cost import cost_usd, fallback_price
from pricing.table import ModelPrice, PriceTable
from pricing.tokens import TokenCounts

TABLE = PriceTable.load_bundled()
PRICING_DIR = Path(__file__).resolve().parent.parent / "pricing"
M = 1_000_000


def T(input: int = 0, cw: int = 0, cw1h: int = 0, cr: int = 0, output: int = 0) -> TokenCounts:
    return TokenCounts(input=input, cache_write=cw, cache_write_1h=cw1h, cache_read=cr, output=output)


COSTS = [
    # --- Claude
    pytest.param("claude-sonnet-4-5", T(12, cw=1500, cr=30_000, output=25),
                 (12 * 3 + 1500 * 3.75 + 30_000 * 0.30 + 25 * 15) / M, id="sonnet-4-5-cached"),
    pytest.param("claude-sonnet-4-5", T(5000, cr=196_000, output=1000),  # 201k prompt > 200k: every rate tiered
                 (5000 * 6 + 196_000 * 0.60 + 1000 * 22.5) / M, id="sonnet-4-5-above-200k"),
    pytest.param("claude-sonnet-4-5", T(4000, cr=196_000, output=1000),  # exactly 200k: base rates
                 (4000 * 3 + 196_000 * 0.30 + 1000 * 15) / M, id="sonnet-4-5-at-200k"),
    pytest.param("claude-sonnet-4", T(1000, cw=100_000, cr=99_001, output=10),
                 (1000 * 6 + 100_000 * 7.5 + 99_001 * 0.60 + 10 * 22.5) / M, id="sonnet-4-above-200k"),
    # LiteLLM 1.80 has no 1h write rate for Sonnet 4.5, so it bills 1h writes at $0; Haiku 4.5 has $2/M.
    pytest.param("claude-sonnet-4-5", T(100, cw1h=10_000, output=100), (100 * 3 + 10_000 * 0 + 100 * 15) / M,
                 id="sonnet-4-5-1h-write-free"),
    pytest.param("claude-haiku-4-5", T(100, cw=1000, cw1h=10_000, cr=5000, output=100),
                 (100 * 1 + 1000 * 1.25 + 10_000 * 2 + 5000 * 0.10 + 100 * 5) / M, id="haiku-4-5-1h-write"),
    pytest.param("claude-opus-4-5", T(100, cw=2000, cw1h=1000, cr=50_000, output=500),
                 (100 * 5 + 2000 * 6.25 + 1000 * 10 + 50_000 * 0.5 + 500 * 25) / M, id="opus-4-5"),
    pytest.param("claude-opus-4-1", T(100, cw=2000, cr=50_000, output=500),
                 (100 * 15 + 2000 * 18.75 + 50_000 * 1.5 + 500 * 75) / M, id="opus-4-1"),
    # --- GPT
    pytest.param("gpt-5-mini", T(31_500 - 30_000, cr=30_000, output=300),
                 (1500 * 0.25 + 30_000 * 0.025 + 300 * 2) / M, id="gpt-5-mini-cached"),
    pytest.param("gpt-5", T(2000, cr=8000, output=1000), (2000 * 1.25 + 8000 * 0.125 + 1000 * 10) / M, id="gpt-5"),
    pytest.param("gpt-5.4", T(72_001, cr=200_000, output=1000),  # 272,001 > 272k
                 (72_001 * 5 + 200_000 * 0.5 + 1000 * 22.5) / M, id="gpt-5.4-above-272k"),
    pytest.param("gpt-5.4", T(72_000, cr=200_000, output=1000),
                 (72_000 * 2.5 + 200_000 * 0.25 + 1000 * 15) / M, id="gpt-5.4-at-272k"),
    # --- Gemini (1.80's gemini-2.5-pro tier has no cache-read key: reads stay at 0.125 above 200k)
    pytest.param("gemini-2.5-pro", T(150_000, cr=50_001, output=1000),
                 (150_000 * 2.5 + 50_001 * 0.125 + 1000 * 15) / M, id="gemini-2.5-pro-above-200k"),
    pytest.param("gemini-2.5-pro", T(150_000, cr=50_000, output=1000),
                 (150_000 * 1.25 + 50_000 * 0.125 + 1000 * 10) / M, id="gemini-2.5-pro-at-200k"),
    pytest.param("gemini-3-pro-preview", T(100_000, cr=100_001, output=1000),
                 (100_000 * 4 + 100_001 * 0.4 + 1000 * 18) / M, id="gemini-3-pro-above-200k"),
    pytest.param("gemini-3-pro-preview", T(100_000, cr=100_000, output=1000),
                 (100_000 * 2 + 100_000 * 0.2 + 1000 * 12) / M, id="gemini-3-pro-at-200k"),
    # --- Qwen: LiteLLM 1.80 prices deepinfra flat, so cached tokens cost the full input rate
    pytest.param("qwen3-coder-480b", T(10_000, cr=50_000, output=2000), ((10_000 + 50_000) * 0.4 + 2000 * 1.6) / M,
                 id="qwen3-coder-480b-flat"),
    # --- Kimi: moonshot is flat in 1.80 too; kimi-k2.5 (override) gets its listed cache-read rate
    pytest.param("kimi-k2-thinking", T(1000, cr=20_000, output=500), ((1000 + 20_000) * 0.6 + 500 * 2.5) / M,
                 id="kimi-k2-thinking-flat"),
    pytest.param("kimi-k2.5", T(1000, cr=20_000, output=500), (1000 * 0.6 + 20_000 * 0.10 + 500 * 3.0) / M,
                 id="kimi-k2.5"),
    # --- GLM
    pytest.param("glm-4.6", T(2000, cr=10_000, output=300), (2000 * 0.6 + 10_000 * 0.11 + 300 * 2.2) / M, id="glm-4.6"),
    pytest.param("glm-5", T(2000, cr=10_000, output=300), (2000 * 1.0 + 10_000 * 0.2 + 300 * 3.2) / M, id="glm-5"),
    # --- Devstral (no cache price anywhere: every prompt token at the input rate)
    pytest.param("devstral-medium-2507", T(5000, cr=3000, output=1000), ((5000 + 3000) * 0.4 + 1000 * 2.0) / M,
                 id="devstral-medium-2507"),
    pytest.param("devstral-small-2505", T(5000, output=1000), (5000 * 0.1 + 1000 * 0.3) / M, id="devstral-small"),
    # --- DeepSeek (1.80: deepseek-reasoner has only `input_cost_per_token_cache_hit`, so cache hits bill $0)
    pytest.param("deepseek-chat", T(1000, cr=9000, output=400), (1000 * 0.27 + 9000 * 0.07 + 400 * 1.1) / M,
                 id="deepseek-chat"),
    pytest.param("deepseek-reasoner", T(1000, cr=9000, output=400), (1000 * 0.55 + 9000 * 0 + 400 * 2.19) / M,
                 id="deepseek-reasoner"),
    # --- MiniMax
    pytest.param("minimax-m2.5", T(1000, cw=2000, cr=8000, output=100),
                 (1000 * 0.3 + 2000 * 0.375 + 8000 * 0.03 + 100 * 1.2) / M, id="minimax-m2.5"),
    pytest.param("minimax-m3", T(12_001, cr=500_000, output=100), (12_001 * 0.6 + 500_000 * 0.12 + 100 * 2.4) / M,
                 id="minimax-m3-above-512k"),
    pytest.param("minimax-m3", T(12_000, cr=500_000, output=100), (12_000 * 0.3 + 500_000 * 0.06 + 100 * 1.2) / M,
                 id="minimax-m3-at-512k"),
]


@pytest.mark.parametrize(("model", "tokens", "expected"), COSTS)
def test_cost_in_dollars(model: str, tokens: TokenCounts, expected: float) -> None:
    price = TABLE.lookup(model)
    assert price is not None
    assert cost_usd(price, tokens) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_reference_figures() -> None:
    """The two costs the reference saw in real `x-litellm-response-cost` headers."""
    assert round(cost_usd(TABLE.lookup("claude-sonnet-4-5"), T(12, cw=1500, cr=30_000, output=25)), 9) == 0.015036
    assert round(cost_usd(TABLE.lookup("gpt-5-mini"), T(1500, cr=30_000, output=300)), 9) == 0.001725


def test_reasoning_tokens_are_not_billed_twice() -> None:
    price = TABLE.lookup("o3")
    plain = TokenCounts(input=1000, output=500)
    with_reasoning = TokenCounts(input=1000, output=500, reasoning=400)  # reasoning is inside output
    assert cost_usd(price, with_reasoning) == cost_usd(price, plain) == (1000 * 2 + 500 * 8) / M


def test_fallback_price_bills_every_prompt_token_at_input() -> None:
    price = fallback_price(2.0, 10.0)
    assert cost_usd(price, T(100, cw=200, cw1h=300, cr=400, output=50)) == pytest.approx(
        ((100 + 200 + 300 + 400) * 2.0 + 50 * 10.0) / M, rel=1e-12
    )


# --- lookup

ALL_MODELS = [
    "claude-opus-4-5", "claude-opus-4-6", "claude-sonnet-4-5", "claude-sonnet-4-6", "claude-sonnet-4-20250514",
    "claude-haiku-4-5", "claude-opus-4-1", "claude-opus-4", "claude-opus-4-7", "claude-opus-4-8", "claude-opus-5",
    "claude-sonnet-5", "claude-fable-5",
    "gpt-5", "gpt-5-mini", "gpt-5-codex", "gpt-5.1", "gpt-5.1-codex", "gpt-5.1-codex-max", "gpt-5.2",
    "gpt-5.2-codex", "gpt-5.4", "gpt-5.5", "o3", "o4-mini", "codex-mini-latest",
    "gemini-2.5-pro", "gemini-3-pro", "gemini-3-pro-preview", "gemini-3.1-pro", "gemini-3.1-pro-preview",
    "gemini-3-flash", "gemini-3-flash-preview",
    "qwen3-coder-480b", "qwen3-coder-next",
    "kimi-k2", "kimi-k2-0711-preview", "kimi-k2-thinking", "kimi-k2.5",
    "glm-4.6", "glm-4.7", "glm-5",
    "devstral-small-2505", "devstral-small-2507", "devstral-medium-2507", "devstral-2512", "devstral-medium-2512",
    "deepseek-chat", "deepseek-reasoner",
    "minimax-m2.1", "minimax-m2.5", "minimax-m3",
]


@pytest.mark.parametrize("model", ALL_MODELS)
@pytest.mark.parametrize("prefix", ["", "openhands/", "litellm_proxy/"])
def test_every_openhands_model_is_priced(prefix: str, model: str) -> None:
    assert TABLE.lookup(prefix + model) is not None


@pytest.mark.parametrize(
    ("sent", "canonical"),
    [
        ("openhands/claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("litellm_proxy/gpt-5-mini", "gpt-5-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("litellm_proxy/gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("claude-sonnet-4", "claude-sonnet-4-20250514"),
        ("Anthropic/Claude-Sonnet-4-5", "claude-sonnet-4-5"),
        ("litellm_proxy/anthropic/claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("vertex_ai/gemini-3-pro", "gemini-3-pro-preview"),
        ("gemini/gemini-2.5-pro", "gemini-2.5-pro"),
        ("moonshot/kimi-k2", "kimi-k2-0711-preview"),
        ("zai/glm-4.7", "glm-4.7"),
        ("mistral/devstral-small-2507", "devstral-small-2507"),
        ("deepseek/deepseek-chat", "deepseek-chat"),
        ("minimax/MiniMax-M2.5", "minimax-m2.5"),
        ("deepinfra/Qwen/Qwen3-Coder-480B-A35B-Instruct", "qwen3-coder-480b"),
    ],
)
def test_aliases_and_prefixes_resolve(sent: str, canonical: str) -> None:
    assert TABLE.lookup(sent) is TABLE.lookup(canonical) is not None


@pytest.mark.parametrize(
    ("a", "b"),
    [("gpt-5", "gpt-5-mini"), ("claude-opus-4-1", "claude-opus-4-5"), ("claude-sonnet-4", "claude-sonnet-4-5"),
     ("gemini-3-pro", "gemini-3-flash"), ("kimi-k2", "kimi-k2.5")],
)
def test_similar_names_do_not_collapse(a: str, b: str) -> None:
    assert TABLE.lookup(a) != TABLE.lookup(b)


@pytest.mark.parametrize("model", ["gpt-4o-banana", "", "openhands/", "claude", "made-up/model-20250101"])
def test_unknown_models_are_none(model: str) -> None:
    assert TABLE.lookup(model) is None


# --- /v1/model/info overlay

def _entry(name: str, deployed: str, **info: object) -> dict:
    return {"model_name": name, "litellm_params": {"model": deployed}, "model_info": info}


def test_model_info_takes_precedence_and_leaves_the_bundled_table_alone() -> None:
    payload = {"data": [_entry("claude-sonnet-4-5-20250929", "anthropic/claude-sonnet-4-5-20250929",
                               input_cost_per_token=4e-6, output_cost_per_token=20e-6,
                               cache_creation_input_token_cost=5e-6, cache_creation_input_token_cost_above_1hr=8e-6,
                               cache_read_input_token_cost=0.4e-6,
                               input_cost_per_token_above_200k_tokens=8e-6,
                               output_cost_per_token_above_200k_tokens=30e-6)]}
    table = TABLE.with_model_info(payload)
    tokens = T(12, cw=1500, cw1h=100, cr=30_000, output=25)
    for sent in ("openhands/claude-sonnet-4-5-20250929", "litellm_proxy/claude-sonnet-4-5"):
        assert cost_usd(table.lookup(sent), tokens) == pytest.approx(
            (12 * 4 + 1500 * 5 + 100 * 8 + 30_000 * 0.4 + 25 * 20) / M, rel=1e-12)
    above = T(10_001, cr=190_000, output=100)  # tier: input/output switch, cache read keeps its base rate
    assert cost_usd(table.lookup("claude-sonnet-4-5"), above) == pytest.approx(
        (10_001 * 8 + 190_000 * 0.4 + 100 * 30) / M, rel=1e-12)
    assert cost_usd(TABLE.lookup("claude-sonnet-4-5"), tokens) == pytest.approx(
        (12 * 3 + 1500 * 3.75 + 100 * 0 + 30_000 * 0.3 + 25 * 15) / M, rel=1e-12)


def test_model_info_adds_models_the_bundle_lacks() -> None:
    table = TABLE.with_model_info({"data": [_entry("brand-new-model", "openai/brand-new-model",
                                                   input_cost_per_token="3e-7", output_cost_per_token=1e-6)]})
    assert TABLE.lookup("openhands/brand-new-model") is None
    assert cost_usd(table.lookup("openhands/brand-new-model"), T(1000, output=1000)) == pytest.approx(
        (1000 * 0.3 + 1000 * 1.0) / M, rel=1e-12)


JUNK = [
    {"model_name": "gpt-5-mini"},
    {"model_name": "gpt-5-mini", "model_info": None},
    _entry("gpt-5-mini", "openai/gpt-5-mini", input_cost_per_token=None, output_cost_per_token=1e-6),
    _entry("gpt-5-mini", "openai/gpt-5-mini", input_cost_per_token="free", output_cost_per_token=1e-6),
    _entry("gpt-5-mini", "openai/gpt-5-mini", input_cost_per_token=True, output_cost_per_token=1e-6),
    _entry("gpt-5-mini", "openai/gpt-5-mini", input_cost_per_token=-1e-6, output_cost_per_token=1e-6),
    _entry("gpt-5-mini", "openai/gpt-5-mini", input_cost_per_token=float("nan"), output_cost_per_token=1e-6),
    _entry("gpt-5-mini", "openai/gpt-5-mini", input_cost_per_token=[1], output_cost_per_token=1e-6),
    _entry("gpt-5-mini", "openai/gpt-5-mini", output_cost_per_token=1e-6),
    "not-a-dict",
    None,
]


@pytest.mark.parametrize("junk", JUNK)
def test_model_info_junk_is_ignored(junk: object) -> None:
    table = TABLE.with_model_info({"data": [junk]})
    assert table.lookup("gpt-5-mini") == TABLE.lookup("gpt-5-mini")


@pytest.mark.parametrize("payload", [None, {}, {"data": None}, {"data": "x"}, [], "garbage"])
def test_model_info_malformed_payload_is_ignored(payload: object) -> None:
    assert TABLE.with_model_info(payload).lookup("gpt-5-mini") == TABLE.lookup("gpt-5-mini")


def test_model_info_junk_next_to_good_entry() -> None:
    payload = {"data": JUNK[:4] + [_entry("gpt-5-mini", "openai/gpt-5-mini", input_cost_per_token=1e-6,
                                          output_cost_per_token=4e-6, cache_read_input_token_cost=None)]}
    price = TABLE.with_model_info(payload).lookup("litellm_proxy/gpt-5-mini")
    assert price == ModelPrice(input=1.0, output=4.0)


# --- the data file

def test_override_entries_cite_a_source() -> None:
    overrides = json.loads((PRICING_DIR / "overrides.json").read_text())["models"]
    assert overrides
    for name, entry in overrides.items():
        assert entry.get("source", "").strip(), name


def test_bundled_table_is_what_the_script_generates() -> None:
    """prices.json must not be hand-edited: regenerating from the pinned LiteLLM JSON gives the same content."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("litellm (test extra) is not installed, so its price JSON is unavailable")
    source = Path(next(iter(spec.submodule_search_locations))) / "model_prices_and_context_window_backup.json"
    bundled = json.loads((PRICING_DIR / "prices.json").read_text())
    regenerated = generate_prices.build(source, PRICING_DIR / "overrides.json")
    assert regenerated == bundled
