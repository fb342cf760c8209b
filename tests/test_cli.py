"""`grokgate serve` without configured keys, and `--model PATH` with any GGUF."""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import Server, start_server, stop_server, user


def test_serve_generates_and_prints_a_token_once(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("cli")
    srv = start_server(tmp, "--slots", "1", env={"GROKGATE_API_KEYS": ""}, name="generated-token")
    try:
        deadline = time.monotonic() + 10
        while "Bearer gg-" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        tokens = re.findall(r"Bearer (gg-[A-Za-z0-9_-]+)", srv.log())
        assert len(tokens) == 1, srv.log()
        token = tokens[0]
        r = srv.chat({"model": "grok-3", "messages": user("Hi"), "max_tokens": 2}, token=token)
        assert r.status_code == 200, r.text
        assert srv.chat({"model": "grok-3", "messages": user("Hi"), "max_tokens": 2}).status_code == 401
        assert srv.log().count(token) == 1, "the token is never logged again"
    finally:
        stop_server(srv)


def test_serve_any_gguf_path(tmp_path_factory: pytest.TempPathFactory, server: Server) -> None:
    """A GGUF the user names is served (here: the default model's file under another name)."""
    import os

    model = server.engine()["model"]
    from grokgate.settings import Settings

    source = Settings().cache_dir / "models" / model
    tmp = tmp_path_factory.mktemp("gguf")
    link = tmp / "my-model.gguf"
    os.symlink(source, link)
    srv = start_server(tmp, "--model", str(link), "--slots", "1", name="custom-gguf")
    try:
        r = srv.chat({"model": "grok-4", "messages": user("Hi"), "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["system_fingerprint"].startswith("fp_local_")
        assert not r.json()["system_fingerprint"].startswith("fp_local_1d9614638d18")
        assert srv.engine()["model"] == "my-model.gguf" or srv.engine()["model"].endswith(".gguf")
    finally:
        stop_server(srv)


def test_missing_gguf_is_reported(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("missing")
    srv = start_server(tmp, "--model", str(tmp / "nope.gguf"), wait_ready=False, name="missing-gguf")
    try:
        deadline = time.monotonic() + 30
        while srv.engine()["error"] is None and time.monotonic() < deadline:
            time.sleep(0.1)
        status = srv.engine()
        assert "nope.gguf" in status["error"]
        with srv.client() as c:
            assert c.get("/readyz").status_code == 503
        r = srv.chat({"model": "grok-3", "messages": user("Hi"), "max_tokens": 2})
        assert r.status_code == 503
        assert "nope.gguf" in r.json()["error"]["message"]
    finally:
        stop_server(srv)
