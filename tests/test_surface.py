"""The HTTP surface around the API: who may scrape /metrics, no redirect built from request headers, the docs
served under the console's security headers, and an `Allow` header on every 405 (issue 9, item 11)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import E2E, TOKEN, Server, call, create_key, err, free_port, ok, start_server, stop_server
from tests.inproc import app_server

CHROMIUM = Path("/usr/bin/chromium")
METRICS_TOKEN = "scrape-secret-7d1e"
SPOOFED_HOST = "evil.example"
# A scrape's first line: the requests counter's HELP (observability/metrics.py).
METRICS_MARK = "# HELP grokgate_requests_total"


def routing_file(tmp: Path) -> Path:
    """Routes to an upstream that is never called: these tests need no model, so none is loaded."""
    path = tmp / "grokgate.yaml"
    path.write_text("""
backends:
  up: {kind: xai, base_url: "http://127.0.0.1:9/v1", api_key_env: XAI_KEY}
models:
  grok-3: [{backend: up}]
""")
    return path


def serve(tmp: Path, name: str, *args: str, **env: str) -> Server:
    return start_server(tmp, *args, env={"GROKGATE_CONFIG": str(routing_file(tmp)), "XAI_KEY": "unused", **env},
                        name=name)


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (the one its default route leaves from), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))  # a UDP connect only picks the source address: nothing is sent
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback else address


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Defaults (metrics for loopback clients only, accounts on), listening on every address of the machine."""
    server = serve(tmp_path_factory.mktemp("surface"), "surface", "--host", "0.0.0.0")
    yield server
    stop_server(server)


def scrape(url: str, **headers: str) -> httpx.Response:
    # verify=False: plain HTTP, so no TLS context to build (~17 ms of CPU per client).
    with httpx.Client(timeout=30, verify=False) as c:
        return c.get(f"{url}/metrics", headers=headers)


# -- /metrics ------------------------------------------------------------------------------------------------

@E2E
def test_metrics_default_serves_loopback_clients(srv: Server) -> None:
    r = scrape(srv.url)
    assert r.status_code == 200, r.text
    assert METRICS_MARK in r.text
    assert r.headers["content-type"].startswith("text/plain")


@E2E
def test_metrics_default_refuses_a_client_from_another_address(srv: Server) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address (the in-process test covers the refusal)")
    port = httpx.URL(srv.url).port
    r = scrape(f"http://{address}:{port}")
    err(r, 403, "forbidden")
    assert METRICS_MARK not in r.text
    assert "GROKGATE_METRICS_ACCESS" in r.json()["error"]["message"]
    # The same client reaches the rest of the API: only the metrics are local.
    assert httpx.get(f"http://{address}:{port}/healthz", timeout=30).status_code == 200


@E2E
@pytest.mark.parametrize("header", ["x-forwarded-for", "forwarded", "x-real-ip"])
def test_metrics_default_refuses_a_relayed_request(srv: Server, header: str) -> None:
    """A request relayed by a proxy on this host is not a local scrape, whatever address the header names."""
    value = "for=127.0.0.1" if header == "forwarded" else "127.0.0.1"
    err(scrape(srv.url, **{header: value}), 403, "forbidden")


@pytest.mark.parametrize(("client", "allowed"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("203.0.113.7", False), ("10.0.0.1", False), ("fd00::2", False), ("::ffff:203.0.113.7", False),
    (None, False),
])
def test_metrics_loopback_decides_on_the_peer_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      client: str | None, allowed: bool) -> None:
    """In process: the ASGI scope's client is the peer (IPv6 and IPv4-mapped forms; no client is refused)."""
    from grokgate.app import create_app
    from grokgate.settings import Settings

    monkeypatch.setenv("XAI_KEY", "unused")
    app = create_app(Settings(api_keys=[TOKEN], accounts=False, config=routing_file(tmp_path), tune_gc=False,
                              data_dir=tmp_path))

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=(client, 40000) if client else ("", 0))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            return await c.get("/metrics")

    r = asyncio.run(get())
    if allowed:
        assert r.status_code == 200 and METRICS_MARK in r.text
    else:
        err(r, 403, "forbidden")


def test_metrics_open_serves_anyone(tmp_path: Path) -> None:
    """In process: over HTTP from this host, relayed or not, and (ASGI) from a peer on another network."""
    with app_server(tmp_path, metrics_access="open") as server:
        assert METRICS_MARK in ok_text(scrape(server.url))
        assert METRICS_MARK in ok_text(scrape(server.url, **{"x-forwarded-for": "203.0.113.7"}))

        async def from_afar() -> httpx.Response:
            transport = httpx.ASGITransport(app=server.app, client=("203.0.113.7", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                return await c.get("/metrics")

        assert METRICS_MARK in ok_text(asyncio.run(from_afar()))


def ok_text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.text


def test_metrics_token_needs_the_bearer_token(tmp_path: Path) -> None:
    """In process (tests/inproc.py): the scrape token is the app's, whatever the serving process."""
    with app_server(tmp_path, metrics_access="token", metrics_token=METRICS_TOKEN) as server:
        for r in (scrape(server.url), scrape(server.url, authorization="Bearer"),
                  scrape(server.url, authorization="Bearer wrong"),
                  scrape(server.url, authorization=f"Bearer {METRICS_TOKEN}x"),
                  scrape(server.url, authorization=f"Basic {base64.b64encode(METRICS_TOKEN.encode()).decode()}"),
                  scrape(server.url, authorization=f"Bearer {TOKEN}")):  # the API's token is not the scrape token
            assert r.status_code == 401, r.text
            assert METRICS_MARK not in r.text
            assert r.json()["error"]["code"] in ("no_token", "invalid_token")
            assert r.headers["www-authenticate"].lower().startswith("bearer")
        err(scrape(server.url), 401, "no_token")
        err(scrape(server.url, authorization="Bearer wrong"), 401, "invalid_token")
        assert METRICS_MARK in ok_text(scrape(server.url, authorization=f"Bearer {METRICS_TOKEN}"))
        assert METRICS_MARK in ok_text(scrape(server.url, authorization=f"bearer  {METRICS_TOKEN}"))


@E2E
def test_metrics_token_mode_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    """`grokgate serve` itself: it exits naming the variable, without a traceback (a rule across settings, which
    has no single variable to name; every empty token is refused alike: the next test)."""
    env = {**os.environ, "GROKGATE_API_KEYS": TOKEN, "GROKGATE_DATA_DIR": str(tmp_path / "data"),
           "GROKGATE_CONFIG": str(routing_file(tmp_path)), "XAI_KEY": "unused", "GROKGATE_METRICS_ACCESS": "token"}
    try:
        done = subprocess.run([sys.executable, "-m", "grokgate", "serve", "--port", str(free_port())], env=env,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"grokgate started without a metrics token:\n{exc.stderr!r}") from None
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "GROKGATE_METRICS_TOKEN" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize("token", [None, "", "   "])
def test_metrics_token_mode_refuses_every_empty_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], token: str | None) -> None:
    """The command line's code in process (`grokgate.cli.main`, what `python -m grokgate` runs), the settings
    from the environment: unset, empty or blank, the token is missing; nothing is served."""
    import uvicorn

    from grokgate.cli import main

    def served(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("grokgate started without a metrics token")

    monkeypatch.setattr(uvicorn, "run", served)
    for name, value in {"GROKGATE_API_KEYS": TOKEN, "GROKGATE_DATA_DIR": str(tmp_path / "data"),
                        "GROKGATE_CONFIG": str(routing_file(tmp_path)), "XAI_KEY": "unused",
                        "GROKGATE_METRICS_ACCESS": "token"}.items():
        monkeypatch.setenv(name, value)
    if token is not None:
        monkeypatch.setenv("GROKGATE_METRICS_TOKEN", token)
    assert main(["serve", "--port", "1"]) == 2
    out, err_text = capsys.readouterr()
    assert "GROKGATE_METRICS_TOKEN" in err_text
    assert "Traceback" not in out + err_text


def test_metrics_off_is_not_there(tmp_path: Path) -> None:
    with app_server(tmp_path, metrics_access="off", metrics_token=METRICS_TOKEN) as server:
        for r in (scrape(server.url), scrape(server.url, authorization=f"Bearer {METRICS_TOKEN}")):
            err(r, 404, "no_api")
            assert METRICS_MARK not in r.text
        with server.client() as c:
            assert "/metrics" not in ok(c.get("/openapi.json"))["paths"]


# -- no redirect built from request headers -------------------------------------------------------------------

def concrete(path: str) -> str:
    return path.replace("{ref}", "1").replace("{model}", "grok-3")


@E2E
def test_trailing_slash_is_a_404_not_a_redirect_to_the_host_header(srv: Server) -> None:
    with srv.client() as c:
        r = c.get("/admin/keys/", headers={"Host": SPOOFED_HOST, "Authorization": f"Bearer {srv.token}"})
    err(r, 404, "no_api")
    assert "location" not in r.headers


@E2E
def test_no_response_carries_a_spoofed_host(srv: Server) -> None:
    """Every documented path, with and without a trailing slash, for every method: no 3xx, and the Host header
    sent is in no response header."""
    paths = [concrete(p) for p in ok(call(srv, "GET", "/openapi.json", None))["paths"]]
    paths += ["/docs", "/docs/", "/docs-static", "/docs-static/", "/console", "/console/", "/console/assets",
              "/console/assets/", "/grok/models/", "/grok/balance/", "/"]
    with srv.client() as c:
        for path in paths:
            for variant in {path, path.rstrip("/") or "/", path.rstrip("/") + "/"}:
                for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                    r = c.request(method, variant, headers={"Host": SPOOFED_HOST,
                                                            "Authorization": f"Bearer {srv.token}"})
                    assert not 300 <= r.status_code < 400, (method, variant, r.status_code, r.headers)
                    leaked = [(k, v) for k, v in r.headers.items() if SPOOFED_HOST in v]
                    assert not leaked, (method, variant, leaked)


# -- /docs under the console's security headers ----------------------------------------------------------------

def csp_of(r: httpx.Response) -> dict[str, list[str]]:
    policy: dict[str, list[str]] = {}
    for directive in r.headers["content-security-policy"].split(";"):
        name, *values = directive.split()
        policy[name] = values
    return policy


@E2E
def test_docs_page_has_a_strict_policy(srv: Server) -> None:
    r = call(srv, "GET", "/docs", None)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    policy = csp_of(r)
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["object-src"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"]
    assert policy["default-src"] == ["'self'"]
    scripts = policy["script-src"]
    assert "'unsafe-inline'" not in scripts and "'unsafe-eval'" not in scripts
    # Exactly the page's own inline script is allowed, by its hash.
    inline = re.findall(r"<script>(.*?)</script>", r.text, re.S)
    assert inline, "Swagger UI is started by an inline script"
    hashes = {f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in inline}
    assert set(scripts) == {"'self'", *hashes}
    # The page does not hand the spec's URL to swagger.io's validator.
    assert '"validatorUrl": null' in r.text


@E2E
@pytest.mark.parametrize("path", ["/openapi.json", "/docs-static/swagger-ui-bundle.js", "/docs-static/swagger-ui.css",
                                  "/docs-static/favicon.png"])
def test_docs_files_are_not_sniffed_or_framed(srv: Server, path: str) -> None:
    r = call(srv, "GET", path, None)
    assert r.status_code == 200
    assert r.headers["x-content-type-options"] == "nosniff"
    assert csp_of(r)["frame-ancestors"] == ["'none'"]
    assert r.headers["referrer-policy"] == "no-referrer"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium to run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM),
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@E2E
def test_docs_render_under_their_policy_in_chromium(srv: Server, browser: Any) -> None:
    """The policy is strict and still enough: Swagger UI renders every operation, nothing is refused."""
    context = browser.new_context(base_url=srv.url)
    try:
        page = context.new_page()
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.add_init_script("""document.addEventListener('securitypolicyviolation',
            e => console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI));""")
        page.goto("/docs")
        try:
            page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        except Exception as exc:  # a refused script leaves the page empty: say what the browser refused
            raise AssertionError(f"Swagger UI did not render: {problems}") from exc
        document = ok(call(srv, "GET", "/openapi.json", None))
        shown = page.locator(".opblock").count()
        assert shown == sum(len(ops) for ops in document["paths"].values())
        page.locator(".opblock-summary-path", has_text="/grok/chat/completions").first.click()
        page.wait_for_selector(".opblock-body")
        assert problems == []
    finally:
        context.close()


# -- 405 carries Allow ---------------------------------------------------------------------------------------

def allow_of(r: httpx.Response) -> set[str]:
    return {m.strip() for m in r.headers["allow"].split(",")}


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PUT", "/admin/keys/1", {"GET", "PATCH", "DELETE"}),
    ("DELETE", "/admin/keys", {"GET", "POST"}),
    ("GET", "/admin/keys/1/credits", {"POST"}),
    ("GET", "/grok/chat/completions", {"POST"}),
    ("PATCH", "/v1/chat/completions", {"POST"}),
    ("POST", "/healthz", {"GET"}),
    ("POST", "/openapi.json", {"GET", "HEAD"}),
    ("POST", "/docs", {"GET"}),
    ("POST", "/docs-static/swagger-ui.css", {"GET", "HEAD"}),
    ("POST", "/console/assets/console.css", {"GET"}),
    ("DELETE", "/console", {"GET"}),
])
@E2E
def test_405_lists_the_allowed_methods(srv: Server, method: str, path: str, allowed: set[str]) -> None:
    r = call(srv, method, path, srv.token)
    err(r, 405, "method_not_allowed")
    assert allow_of(r) == allowed


@E2E
def test_every_405_carries_allow(srv: Server) -> None:
    """Any method a documented path does not declare answers 405 naming the declared ones."""
    document = ok(call(srv, "GET", "/openapi.json", None))
    with srv.client() as c:
        for path, operations in document["paths"].items():
            declared = {m.upper() for m in operations}
            for method in {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - declared:
                r = c.request(method, concrete(path), headers={"Authorization": f"Bearer {srv.token}"})
                assert r.status_code == 405, (method, path, r.text)
                assert allow_of(r) - {"HEAD"} == declared, (method, path, r.headers.get("allow"))


# -- found by the schemathesis run (tests/test_openapi_contract.py) ------------------------------------------

@E2E
@pytest.mark.parametrize("query", [{"until": "0001-01-01"}, {"until": "0001-01-29"},
                                   {"since": "0001-01-01", "until": "0001-01-31"},
                                   {"since": "9999-12-31", "until": "9999-12-31"}])
def test_error_counts_at_the_ends_of_the_calendar(srv: Server, query: dict[str, str]) -> None:
    """The default window (30 days back from `until`) cannot reach before year 1: it stops there."""
    for path in ("/admin/ledger/errors", "/v1/ledger/errors"):
        token = srv.token if path.startswith("/admin") else holder(srv)
        body = ok(call(srv, "GET", path, token, params=query))
        assert body["total"] == 0
        assert body["since"] <= body["until"]


_holder: list[str] = []


def holder(srv: Server) -> str:
    if not _holder:
        _holder.append(create_key(srv, "surface-holder", "1")[0])
    return _holder[0]
