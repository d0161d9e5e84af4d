"""The authoritative confirmation read (DESIGN §7, reference/litellm-errors.md §2 rule 6).

Before a key is retired on a verdict that contradicts the meter, the sidecar asks the upstream
itself: a body-less `GET {upstream}/v1/models` with the pool key. As an LLM route it re-runs
LiteLLM's key-dead (K1–K3), owner (O1, B5, B6) and key-budget (B1–B3) checks, and — having no
model, end user, tags or body — none of the request-scoped ones. So only a refusal of *this* key
comes back; the client's request cannot shape the answer.

Blocking: callers run it off the event loop (`asyncio.to_thread`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import requests

from addon.core.answers import KeyContext, UpstreamVerdict, classify_response
from addon.core.masking import mask_in_text

log = logging.getLogger(__name__)

PROBE_PATH = "/v1/models"
PROBE_TIMEOUT = (5.0, 10.0)


@dataclass(frozen=True)
class ProbeResult:
    """`confirmed`: the upstream refused this key on the probe too (dead or spent)."""

    confirmed: bool
    status: int | None
    verdict: UpstreamVerdict | None
    detail: str


def probe_key(session: requests.Session, upstream: str, key: KeyContext,
              timeout: tuple[float, float] = PROBE_TIMEOUT, now: float | None = None) -> ProbeResult:
    """`GET {upstream}/v1/models` with the key; whether the upstream confirms the key is dead or spent.

    A network error or a 5xx confirms nothing (the key stays as it is and the answer passes through).
    """
    url = upstream.rstrip("/") + PROBE_PATH
    try:
        resp = session.get(url, headers={"x-litellm-api-key": key.api_key, "accept": "application/json",
                                         "accept-encoding": "identity"},
                           timeout=timeout, allow_redirects=False)
    except requests.RequestException as e:
        return ProbeResult(False, None, None, f"probe failed: {e.__class__.__name__}")
    try:
        content = resp.content[:1 << 20]
    except Exception as e:  # noqa: BLE001 - a broken body confirms nothing
        return ProbeResult(False, resp.status_code, None, f"probe body unreadable: {e.__class__.__name__}")
    verdict = classify_response(resp.status_code, resp.headers, content, time.time() if now is None else now, key=key)
    confirmed = verdict.kind in ("invalid", "budget")
    snippet = mask_in_text(content[:160].decode("utf-8", "replace"), (key.api_key,))
    return ProbeResult(confirmed, resp.status_code, verdict,
                       f"HTTP {resp.status_code} {verdict.scope}" + ("" if resp.status_code == 200 else f": {snippet}"))
