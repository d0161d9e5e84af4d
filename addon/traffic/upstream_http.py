"""HTTP requests the addon itself makes to the upstream: retries and spend polls.

`trust_env = False` so the sidecar's own HTTP(S)_PROXY variables cannot loop a retry back into
the sidecar; when mitmproxy runs in upstream-proxy mode, these requests leave through that proxy.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import requests
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode
from requests.adapters import HTTPAdapter

HOP_BY_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer",
              "upgrade", "proxy-authorization", "proxy-connection", "accept-encoding"}


def upstream_proxy_from_modes(modes: Iterable[str]) -> str | None:
    """`--mode upstream:http://egress:3128` -> that proxy URL (regular/reverse modes -> None)."""
    for mode in modes:
        spec = mode.split("@", 1)[0] if mode.startswith("upstream:") and "@" in mode.split("://", 1)[-1] else mode
        if spec.startswith("upstream:"):
            url = spec[len("upstream:"):]
            return url if "://" in url else "http://" + url
    return None


def reverse_targets(modes: Sequence[str]) -> list[str]:
    """The http(s) targets of the `reverse:` entries of mitmproxy's `mode` option, in order, deduplicated."""
    targets: list[str] = []
    for spec in modes:
        try:
            mode = ProxyMode.parse(spec)
        except ValueError:
            continue  # mitmproxy reports its own bad mode
        if isinstance(mode, ReverseMode) and mode.scheme in ("http", "https"):
            host, port = mode.address
            default_port = 443 if mode.scheme == "https" else 80
            url = f"{mode.scheme}://{_url_host(host)}" + ("" if port == default_port else f":{port}")
            if url not in targets:
                targets.append(url)
    return targets


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host.lower()


def make_session(proxy: str | None = None, *, verify: bool = True, pool_size: int = 32) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    if proxy:
        session.proxies = {"http": proxy, "https": proxy}
    session.verify = verify
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def forward_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


def resend(session: requests.Session, method: str, url: str, headers: Iterable[tuple[str, str]], body: bytes | None,
           timeout: tuple[float, float] = (10.0, 600.0)) -> requests.Response:
    """Send the same request again (blocking; callers run it off the event loop)."""
    hdrs: requests.structures.CaseInsensitiveDict[str] = requests.structures.CaseInsensitiveDict()
    for k, v in forward_headers(headers):
        hdrs[k] = v
    hdrs["accept-encoding"] = "identity"
    return session.request(method, url, headers=hdrs, data=body or None, timeout=timeout, allow_redirects=False)


def response_headers(resp: requests.Response) -> list[tuple[bytes, bytes]]:
    """Headers of a retried answer as mitmproxy wants them (body is already decoded and whole)."""
    drop = {"content-length", "transfer-encoding", "content-encoding", "connection", "keep-alive"}
    raw: Mapping = getattr(resp.raw, "headers", None) or resp.headers
    items = raw.items() if not hasattr(raw, "getlist") else ((k, v) for k in raw for v in raw.getlist(k))
    return [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in items if k.lower() not in drop]
