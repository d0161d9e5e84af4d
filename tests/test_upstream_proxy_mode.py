"""Corporate egress (DESIGN §8): in `--mode upstream:…` the addon's own requests leave through that proxy."""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import requests

from addon.traffic.upstream_http import make_session, upstream_proxy_from_modes


@pytest.mark.parametrize("modes,expected", [
    ([], None),
    (["regular"], None),
    (["reverse:https://llm-proxy.app.all-hands.dev"], None),
    (["upstream:http://egress:3128"], "http://egress:3128"),
    (["upstream:egress:3128"], "http://egress:3128"),
    (["regular", "upstream:https://egress.corp:8443"], "https://egress.corp:8443"),
])
def test_upstream_proxy_from_modes(modes, expected):
    assert upstream_proxy_from_modes(modes) == expected


def test_session_never_trusts_the_environment(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")  # e.g. pointing back at the sidecar itself
    session = make_session("http://egress:3128")
    assert session.trust_env is False
    assert session.proxies == {"http": "http://egress:3128", "https": "http://egress:3128"}


class RecordingProxy:
    """A minimal forward HTTP proxy for absolute-form requests; remembers what passed."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                target = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                proxy.seen.append((self.command, target.path, self.headers.get("x-litellm-api-key")
                                   or self.headers.get("authorization")))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("proxy-connection", "connection", "host")}
                conn.request(self.command, target.path + (f"?{target.query}" if target.query else ""), body, headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.e2e
def test_retries_leave_through_the_upstream_proxy(sidecar_factory, upstream):
    upstream.add_key("sk-egress-k1-0123456789abcdef", budget=10, spend=10.2)  # over budget: forces a retry
    upstream.add_key("sk-egress-k2-0123456789abcdef", budget=10)
    with RecordingProxy() as egress:
        sc = sidecar_factory(mode=f"upstream:{egress.url}")
        for n in ("k1", "k2"):
            r = requests.post(upstream.url + "/admin/openhands/keys", proxies=sc.proxies, timeout=10,
                              json={"id": n, "apiKey": f"sk-egress-{n}-0123456789abcdef"})
            assert r.status_code == 201, r.text
        r = requests.post(upstream.url + "/chat/completions", proxies=sc.proxies, timeout=20,
                          json={"model": "claude-sonnet-4-5", "messages": []})
        assert r.status_code == 200, r.text
        llm = [s for s in egress.seen if s[1] == "/chat/completions"]
        # the first try (mitmproxy's own connection) and the addon's retry both went through the egress proxy
        assert len(llm) == len([q for q in upstream.requests if q.path == "/chat/completions"]) == 2
        assert not any(s[1].startswith("/admin") for s in egress.seen)  # admin is answered locally
