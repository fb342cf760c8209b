"""Probes, models, the OpenAPI document and docs, the engine's own listener."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Server

pytestmark = pytest.mark.e2e  # the real server, model or databases (tests/conftest.py)


def test_health_and_readiness(server: Server) -> None:
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
    assert ready.status_code == 200
    local = ready.json()["backends"]["local"]
    assert local["ready"] is True
    assert local["slots"] == 4


def test_models_list_needs_a_token(server: Server) -> None:
    with server.client() as c:
        assert c.get("/v1/models").status_code == 400
        body = c.get("/v1/models", headers={"Authorization": f"Bearer {server.token}"}).json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} >= {"grok-4", "grok-3", "grok-2-vision"}
    assert all(m["object"] == "model" and m["owned_by"] == "grokgate" for m in body["data"])


def test_openapi_describes_the_real_request(server: Server) -> None:
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    assert "/grok/chat/completions" in spec["paths"]
    assert "/v1/chat/completions" in spec["paths"]
    schema = spec["components"]["schemas"]["ChatCompletionRequest"]
    props = schema["properties"]
    assert set(schema["required"]) == {"model", "messages"}
    assert props["messages"]["minItems"] == 1
    n = next(s for s in props["n"]["anyOf"] if s.get("type") == "integer")
    assert (n["minimum"], n["maximum"]) == (1, 128)
    temperature = next(s for s in props["temperature"]["anyOf"] if s.get("type") == "number")
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    # A schema per role (or several per role), each naming it; what each requires is tests/test_chat_schema.py's.
    message = spec["components"]["schemas"]["Message"]
    roles = [branch["properties"]["role"]["const"] for branch in message["anyOf"]]
    assert set(roles) == {"system", "developer", "user", "assistant", "tool"}


def test_docs_work_offline(server: Server) -> None:
    with server.client() as c:
        page = c.get("/docs")
        assert page.status_code == 200
        assert "/docs-static/swagger-ui-bundle.js" in page.text
        assert "cdn" not in page.text.lower()
        js = c.get("/docs-static/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000


def _listening_tcp_inodes() -> dict[int, int]:
    """inode -> port of every listening TCP socket on this machine."""
    result = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                result[int(fields[9])] = int(fields[1].rsplit(":", 1)[1], 16)
    return result


def test_engine_listener_is_not_on_tcp(server: Server) -> None:
    """xllamacpp always opens llama.cpp's HTTP listener; grokgate keeps it off TCP, on a private socket."""
    listening = _listening_tcp_inodes()
    ours = set()
    unix_sockets = 0
    fd_dir = Path(f"/proc/{server.process.pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inode = int(target[8:-1])
            if inode in listening:
                ours.add(listening[inode])
            else:
                unix_sockets += 1
    assert ours == {int(server.url.rsplit(":", 1)[1])}, ours
    # This server's own engine socket (not another run's leftovers in /tmp): a Unix socket the process holds,
    # bound in a private directory.
    bound = _bound_unix_paths(server.process.pid)
    engine = [p for p in bound if p.name == "llama.sock" and p.parent.name.startswith("grokgate-engine-")]
    assert len(engine) == 1, bound
    assert oct(engine[0].parent.stat().st_mode & 0o777) == "0o700", "the engine's socket lives in a private directory"
    assert engine[0].parent.stat().st_uid == os.getuid()


def _bound_unix_paths(pid: int) -> list[Path]:
    """The paths of the Unix sockets that process `pid` has bound (matched by inode in /proc/net/unix)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[6]) in inodes and fields[7].startswith("/"):
            paths.append(Path(fields[7]))
    return paths


def test_local_engine_metrics(server: Server) -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    def read() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics").text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}

    before = read()
    r = server.chat({"model": "grok-3", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "n": 2})
    assert r.status_code == 200
    after = read()
    assert after["grokgate_local_jobs_started_total"] - before["grokgate_local_jobs_started_total"] == 2
    generated = after["grokgate_local_tokens_generated_total"] - before["grokgate_local_tokens_generated_total"]
    assert generated == r.json()["usage"]["completion_tokens"]
    assert after["grokgate_local_queue_wait_seconds_total"] >= before["grokgate_local_queue_wait_seconds_total"]
    assert after["grokgate_local_queued_jobs"] == 0
