"""Tests never touch the user's data or cache: `make test` passes while `make serve` runs in another shell.

The harness (tests/conftest.py) gives the session its own XDG and GROKGATE directories before any test runs,
so an app built with default settings, in process or in a subprocess, opens a SQLite file of the session's,
never the user's (which a running `grokgate serve` holds locked: issue 10's five-minute hang).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grokgate.app import create_app
from grokgate.settings import Settings
from tests.conftest import E2E, TOKEN, session_dir, user
from tests.inproc import ScriptedProvider, app_server, app_settings, scripted_models, serve_app

ROOT = Path(__file__).resolve().parent.parent


def test_the_session_has_directories_of_its_own() -> None:
    settings = Settings()
    home = Path.home().resolve()
    for path in (settings.data_dir, settings.cache_dir, Path(os.environ["XDG_DATA_HOME"]),
                 Path(os.environ["XDG_CACHE_HOME"])):
        assert path.resolve().is_relative_to(session_dir().resolve()), path
        assert not path.resolve().is_relative_to(home) or session_dir().resolve().is_relative_to(home), path
    # The caller's own settings do not leak into the tests (a GROKGATE_CONFIG or a database URL of theirs); the
    # session's own: its directories, and no gRPC port (tests/conftest.py: 50051 may be a running `make serve`'s).
    assert not [n for n in os.environ if n.startswith("GROKGATE_") and not n.startswith("GROKGATE_TEST_")
                and n not in ("GROKGATE_DATA_DIR", "GROKGATE_CACHE_DIR", "GROKGATE_GRPC_PORT")]
    assert os.environ["GROKGATE_GRPC_PORT"] == "0"


def test_an_app_with_default_settings_keeps_to_the_session() -> None:
    """What issue 10's newcomer hit: an in-process app built without explicit directories. It starts, serves,
    and its SQLite file is the session's."""
    settings = Settings(api_keys=[TOKEN], tune_gc=False)
    app = create_app(settings, models=scripted_models(ScriptedProvider()))
    with serve_app(app) as served:
        r = served.chat({"model": "grok-3", "messages": user("hi")})
    assert r.status_code == 200, r.text
    assert (settings.data_dir / "grokgate.db").is_file()
    assert settings.data_dir.resolve().is_relative_to(session_dir().resolve())


def test_an_app_that_cannot_start_fails_its_fixture_at_once(tmp_path: Path) -> None:
    """A second app on a SQLite file another holds cannot start: serving it raises with the reason as soon as
    its lifespan fails, not after a long timeout (the message tells the two apart)."""
    with app_server(tmp_path) as first:
        assert first.chat({"model": "grok-3", "messages": user("hi")}).status_code == 200
        second = create_app(app_settings(tmp_path), models=scripted_models(ScriptedProvider()))
        with pytest.raises(RuntimeError, match="its lifespan failed"), serve_app(second, start_timeout=600):
            pass


@E2E
def test_the_tests_pass_while_a_server_holds_the_users_data_dir(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A user with `grokgate serve` running on the default directories (a home of its own here) runs the tests
    from a fresh shell: they pass, and at once. Without the harness (--noconftest) the same test fails, at
    once, on the lock: so this scenario is the one of the original bug.

    The user's server is an app served in this process, its settings read from the user's shell (as `grokgate
    serve` reads them): what the tests run below meet is its lock on the SQLite file of that home, which a
    separate process holds the same way."""
    home = tmp_path / "home"
    home.mkdir()
    shell = {k: v for k, v in os.environ.items()
             if not k.startswith(("GROKGATE_", "XDG_", "PYTEST_")) and k != "XAI_API_KEY"}
    shell["HOME"] = str(home)
    with monkeypatch.context() as users_shell:
        for name in [n for n in os.environ if n not in shell]:
            users_shell.delenv(name)
        for name, value in shell.items():
            users_shell.setenv(name, value)
        # Its gRPC port off: this stand-in is about the data dir's lock, and the port it would take (50051) may be
        # a real `make serve`'s while the tests run.
        settings = Settings(api_keys=[TOKEN], tune_gc=False, grpc_port=0)
    # No local engine: nothing to load into the fake home's cache.
    with serve_app(create_app(settings, models=scripted_models(ScriptedProvider()))):
        data_dir = home / ".local" / "share" / "grokgate"
        assert settings.data_dir == data_dir
        assert (data_dir / "grokgate.db.lock").is_file()
        test = f"{Path(__file__).relative_to(ROOT)}::test_an_app_with_default_settings_keeps_to_the_session"

        def run(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x",
                                   *extra, test], cwd=ROOT,
                                  env={**shell, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}, capture_output=True,
                                  text=True, timeout=120)

        isolated = run()
        assert isolated.returncode == 0, isolated.stdout[-3000:] + isolated.stderr[-3000:]
        unisolated = run("--noconftest")
        assert unisolated.returncode == 1, unisolated.stdout[-3000:]
        assert "did not start" in unisolated.stdout, unisolated.stdout[-3000:]
