"""The floor of `python -m bench --only realprofile`: the least a key-pool addon can do per request.

It swaps the client's credential for one pool key and meters the JSON answer's usage into a dict (no key choice,
no budget, no store, no journal), so a mitmdump running it shows what any such addon costs above bare mitmdump;
the sidecar's cost above this floor is what its own design adds. Loaded by mitmdump as a script (`-s`), so it
imports nothing from the project: the key is `bench.procs.pool_keys(20)[0]`, which the fake upstream accepts
(tests/test_bench_real_profile.py checks that they agree).
"""
from __future__ import annotations

import json
from typing import Any

KEY = "Bearer sk-bench-pool-01-xxxxxxxxxxxxxxxxxxxxxxxx"
PROMPT_PRICE = 1e-7  # $ per token; any price will do, the work is the same
COMPLETION_PRICE = 4e-7
spend: dict[str, float] = {}


def request(flow: Any) -> None:
    flow.request.headers["authorization"] = KEY


def response(flow: Any) -> None:
    try:
        usage = json.loads(flow.response.raw_content).get("usage") or {}
        cost = usage.get("prompt_tokens", 0) * PROMPT_PRICE + usage.get("completion_tokens", 0) * COMPLETION_PRICE
    except (ValueError, AttributeError, TypeError):
        return
    spend[KEY] = spend.get(KEY, 0.0) + cost
    flow.comment = f"${cost:.6f}"
