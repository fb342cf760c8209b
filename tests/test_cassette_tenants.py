"""Cassettes belong to a tenant (providers/cassette_store.py, docs/replay.md): with accounts on, a token records
into and replays from its own cassettes, and a replay_miss compares with and quotes only those; the shared mode
keeps "record with one key, replay with another". Files are private, names cannot hide them, and a recording
that would pass its bounds is refused before the backend. In-process: the real app over HTTP, a scripted backend.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from grokgate.cli import main as cli_main
from grokgate.core import cassette
from grokgate.core.errors import GatewayError
from tests.conftest import TOKEN, create_key, err, ok, user
from tests.inproc import ScriptedProvider, app_server, scripted_models

SECRET = "Internal key: HR-SECRET-7781. What is Ann's salary?"


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "grok-3", "messages": user(text), **extra}


def post(srv: Any, body: dict[str, Any], *, token: str = TOKEN, cassette_name: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if cassette_name is not None:
        headers["x-grokgate-cassette"] = cassette_name
    with srv.client() as c:
        return c.post("/grok/chat/completions", json=body, headers=headers)


def answer(r: httpx.Response) -> str:
    return str(ok(r)["choices"][0]["message"]["content"])


def metric(srv: Any, prefix: str) -> list[str]:
    with srv.client() as c:
        return [line for line in c.get("/metrics").text.splitlines() if line.startswith(prefix)]


@pytest.fixture
def private_umask() -> Iterator[None]:
    """The usual umask (022): what a file's mode shows is then what grokgate asked for, not the test runner's."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_a_tenant_replays_only_its_own_recordings_and_its_misses_quote_only_them(tmp_path: Path) -> None:
    """Before: token B's unrelated request got a replay_miss quoting token A's prompt, B replayed A's answer, and
    B's recording went into the cassette A replays from."""
    directory = tmp_path / "cassettes"
    provider = ScriptedProvider("s", text="Ann earns 91,000")
    with app_server(tmp_path / "srv", scripted_models(provider), record_dir=directory) as srv:
        a, _ = create_key(srv, "a", credits="10")
        b, _ = create_key(srv, "b", credits="10")
        assert answer(post(srv, chat(SECRET), token=a)) == "Ann earns 91,000"
        provider.text = "written by b"
        assert answer(post(srv, chat(SECRET), token=b)) == "written by b"  # the same cassette name, B's own
    # The same accounts database: the same tokens, now against a server that only replays.
    with app_server(tmp_path / "srv", None, replay_dir=directory) as srv:
        said = [answer(post(srv, chat(SECRET), token=a)) for _ in range(2)]
        assert said == ["Ann earns 91,000", "Ann earns 91,000"]  # B's recording is not in A's cassette
        assert answer(post(srv, chat(SECRET), token=b)) == "written by b"
        c, _ = create_key(srv, "c", credits="10")
        for body in (chat(SECRET), chat("What is the weather in Paris?")):
            r = post(srv, body, token=c)
            err(r, 404, "replay_miss")
            assert "HR-SECRET" not in r.text and "91,000" not in r.text and "no recordings" in r.text
        r = post(srv, chat("What is the weather in Paris?"), token=b)
        err(r, 404, "replay_miss", "messages")
        assert "HR-SECRET" in r.text  # B's own recording of the same prompt is B's to be told about
    texts = {p.read_text() for p in directory.rglob("*.jsonl")}
    assert len(texts) == 2 and all(t.count("\n") == 1 for t in texts)  # one exchange in each tenant's cassette
    assert not (directory / "default.jsonl").exists()


def test_shared_cassettes_replay_across_tokens(tmp_path: Path) -> None:
    """GROKGATE_CASSETTE_SCOPE=shared: record with one token, replay with another (docs/replay.md's CI workflow)."""
    directory = tmp_path / "cassettes"
    with app_server(tmp_path / "srv", scripted_models(ScriptedProvider("s", text="shared answer")),
                    record_dir=directory, cassette_scope="shared") as srv:
        a, _ = create_key(srv, "a", credits="10")
        assert answer(post(srv, chat("Say hi"), token=a)) == "shared answer"
    assert (directory / "default.jsonl").is_file()
    with app_server(tmp_path / "srv", None, replay_dir=directory, cassette_scope="shared") as srv:
        b, _ = create_key(srv, "b", credits="10")
        assert answer(post(srv, chat("Say hi"), token=b)) == "shared answer"
        assert answer(post(srv, chat("Say hi"), token=TOKEN)) == "shared answer"


def test_the_cli_addresses_a_tenants_cassettes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "cassettes"
    with app_server(tmp_path / "srv", scripted_models(ScriptedProvider("s", text="hers")), record_dir=directory
                    ) as srv:
        a, key = create_key(srv, "a", credits="10")
        ok(post(srv, chat("Mine"), token=a, cassette_name="suite"))
    tenant = f"account:{key['account_id']}"
    assert cli_main(["cassettes", "list", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    assert tenant in out and "suite" in out and "grok-3" in out
    assert cli_main(["cassettes", "show", "suite", "--dir", str(directory), "--tenant", tenant]) == 0
    assert "'hers'" in capsys.readouterr().out
    assert cli_main(["cassettes", "show", "suite", "--dir", str(directory)]) == 1  # not a shared cassette
    assert cli_main(["cassettes", "prune", "--dir", str(directory), "--tenant", tenant]) == 0
    assert "suite: 1 kept, 0 removed" in capsys.readouterr().out


def test_cassette_files_are_private(tmp_path: Path, private_umask: None) -> None:
    """Before: 0644 (a cassette holds prompts and answers)."""

    def modes(root: Path) -> dict[str, int]:
        return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}

    def private(path: str, mode: int) -> bool:
        return mode == (0o700 if (tmp_path / path).is_dir() else 0o600)

    shared = tmp_path / "shared"
    with app_server(tmp_path / "a", scripted_models(ScriptedProvider("s")), record_dir=shared,
                    accounts=False) as srv:
        ok(post(srv, chat("Hi"), cassette_name="named"))
    assert (shared / "named.jsonl").is_file()
    assert all(private(p, m) for p, m in modes(shared).items()), {p: oct(m) for p, m in modes(shared).items()}
    per_tenant = tmp_path / "per-tenant"
    with app_server(tmp_path / "b", scripted_models(ScriptedProvider("s")), record_dir=per_tenant) as srv:
        a, _ = create_key(srv, "a", credits="10")
        ok(post(srv, chat("Hi"), token=a))
    assert len(list(per_tenant.rglob("*.jsonl"))) == 1
    assert all(private(p, m) for p, m in modes(per_tenant).items()), {
        p: oct(m) for p, m in modes(per_tenant).items()}


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "..x"])
def test_a_cassette_name_starting_with_a_dot_is_refused(tmp_path: Path, name: str) -> None:
    """Before: `..` was recorded as `...jsonl`, a hidden file."""
    with pytest.raises(GatewayError) as caught:
        cassette.cassette_name(name)
    assert caught.value.param == cassette.HEADER
    directory = tmp_path / "cassettes"
    with app_server(tmp_path / "srv", scripted_models(ScriptedProvider("s")), record_dir=directory,
                    accounts=False) as srv:
        error = err(post(srv, chat("Hi"), cassette_name=name), 400, "bad_request", "x-grokgate-cassette")
        assert "not starting with '.'" in error["message"]
        ok(post(srv, chat("Hi"), cassette_name="a.b"))  # a dot inside a name is fine
    assert sorted(p.name for p in directory.iterdir()) == ["a.b.jsonl", "a.b.jsonl.lock"]


def test_a_recording_past_its_cassettes_bound_is_refused_before_the_backend(tmp_path: Path) -> None:
    directory = tmp_path / "cassettes"
    provider = ScriptedProvider("s", text="ok")
    with app_server(tmp_path / "srv", scripted_models(provider), record_dir=directory, accounts=False,
                    max_cassette_bytes=4096) as srv:
        ok(post(srv, chat("small")))
        asked = len(provider.requests)
        error = err(post(srv, chat("x" * 5000)), 507, "cassette_full", "x-grokgate-cassette")
        assert "GROKGATE_MAX_CASSETTE_BYTES" in error["message"] and "4096" in error["message"]
        assert "'default'" in error["message"]
        assert len(provider.requests) == asked  # it never reached the backend
        ok(post(srv, chat("small"), cassette_name="other"))  # another cassette has room
        assert metric(srv, "grokgate_cassette_refused_total") == [
            'grokgate_cassette_refused_total{reason="cassette"} 1.0']
    assert (directory / "default.jsonl").stat().st_size <= 4096


def test_a_recording_past_the_directorys_bound_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "cassettes"
    provider = ScriptedProvider("s", text="ok")
    with app_server(tmp_path / "srv", scripted_models(provider), record_dir=directory, accounts=False,
                    max_cassette_dir_bytes=3000) as srv:
        statuses = [post(srv, chat(f"question {i}"), cassette_name=f"c{i}").status_code for i in range(8)]
        assert 200 in statuses and 507 in statuses, statuses
        refused = statuses.index(507)
        assert set(statuses[refused:]) == {507}
        error = err(post(srv, chat("one more"), cassette_name="fresh"), 507, "cassette_full")
        assert "GROKGATE_MAX_CASSETTE_DIR_BYTES" in error["message"] and "3000" in error["message"]
        assert len(provider.requests) == refused
        assert metric(srv, "grokgate_cassette_refused_total") == [
            f'grokgate_cassette_refused_total{{reason="directory"}} {float(len(statuses) - refused + 1)}']
    assert sum(p.stat().st_size for p in directory.glob("*.jsonl")) <= 3000


def test_each_tenant_has_its_own_directory_bound(tmp_path: Path) -> None:
    directory = tmp_path / "cassettes"
    with app_server(tmp_path / "srv", scripted_models(ScriptedProvider("s", text="ok")), record_dir=directory,
                    max_cassette_dir_bytes=2048) as srv:
        a, _ = create_key(srv, "a", credits="10")
        b, _ = create_key(srv, "b", credits="10")
        codes = [post(srv, chat(f"q{i}"), token=a, cassette_name=f"c{i}").status_code for i in range(6)]
        assert codes[-1] == 507
        ok(post(srv, chat("q"), token=b))  # A's full directory is not B's


def test_record_missing_fills_each_tenants_own_cassette(tmp_path: Path) -> None:
    directory = tmp_path / "cassettes"
    live = ScriptedProvider("live", text="for a")
    with app_server(tmp_path / "srv", scripted_models(live), replay_dir=directory, record_missing=True) as srv:
        a, _ = create_key(srv, "a", credits="10")
        b, _ = create_key(srv, "b", credits="10")
        assert answer(post(srv, chat(SECRET), token=a)) == "for a"  # a miss: live, appended to A's cassette
        live.text = "for b"
        assert answer(post(srv, chat(SECRET), token=b)) == "for b"  # not A's recording: live again, B's own
        assert answer(post(srv, chat(SECRET), token=a)) == "for a"  # A's recording, replayed
        assert len(live.requests) == 2
    assert len(list(directory.rglob("*.jsonl"))) == 2


# -- upgrading from tokens to accounts (migration 0006) ---------------------------------------------------------------

def as_before_accounts(directory: Path, account_id: int) -> Path:
    """Move an account's cassettes to where a server before migration 0006 recorded the same key's: the tenant was
    the token, `token:<id>`, and 0006 gave each token's account the token's id."""
    tenants = directory / cassette.TENANTS
    old = tenants / cassette.tenant_dir(f"token:{account_id}")
    os.rename(tenants / cassette.tenant_dir(f"account:{account_id}"), old)
    (old / ".tenant").write_text(f"token:{account_id}\n")
    return old


def test_a_tokens_cassettes_from_before_accounts_replay_for_its_account(tmp_path: Path) -> None:
    """Before: after the upgrade the account's key got replay_miss ("no recordings"): its cassettes sat under the
    token's tenant directory, which no request looks in any more."""
    directory = tmp_path / "cassettes"
    with app_server(tmp_path / "srv", scripted_models(ScriptedProvider("s", text="recorded before")),
                    record_dir=directory) as srv:
        a, key = create_key(srv, "a", credits="10")
        ok(post(srv, chat("Old prompt"), token=a, cassette_name="suite"))
    old = as_before_accounts(directory, key["account_id"])
    with app_server(tmp_path / "srv", None, replay_dir=directory) as srv:
        assert answer(post(srv, chat("Old prompt"), token=a, cassette_name="suite")) == "recorded before"
        b, _ = create_key(srv, "b", credits="10")  # another account does not inherit it
        err(post(srv, chat("Old prompt"), token=b, cassette_name="suite"), 404, "replay_miss")
    assert not old.exists()
    moved = directory / cassette.TENANTS / cassette.tenant_dir(f"account:{key['account_id']}")
    assert (moved / ".tenant").read_text() == f"account:{key['account_id']}\n"
    assert (moved / "suite.jsonl").is_file()


def test_carrying_over_merges_without_overwriting_and_survives_an_interruption(tmp_path: Path) -> None:
    from grokgate.providers.cassette_tenants import carry_over

    tenants = tmp_path / cassette.TENANTS

    def tenant(whose: str, **files: str) -> Path:
        d = tenants / cassette.tenant_dir(whose)
        d.mkdir(parents=True)
        (d / ".tenant").write_text(whose + "\n")
        for name, text in files.items():
            (d / f"{name}.jsonl").write_text(text)
        return d

    token_5 = tenant("token:5", suite="old suite\n", other="old other\n")
    (token_5 / "suite.jsonl.lock").touch()
    account_5 = tenant("account:5", suite="new suite\n")  # recorded after the upgrade, before the carry-over
    interrupted = tenant("account:6", suite="six\n")
    (interrupted / ".tenant").write_text("token:6\n")  # renamed, not yet relabelled
    untouched = [tenant("account:7", suite="seven\n"), tenant("key:key-abc", suite="static\n")]
    before = {p: p.read_text() for d in untouched for p in d.iterdir()}

    assert len(carry_over(tmp_path)) == 1  # token 5 merged; account 6 only relabelled
    assert not token_5.exists()
    assert (account_5 / "suite.jsonl").read_text() == "new suite\n"
    assert (account_5 / "suite-pre-accounts.jsonl").read_text() == "old suite\n"
    assert (account_5 / "other.jsonl").read_text() == "old other\n"
    assert (interrupted / ".tenant").read_text() == "account:6\n"
    assert {p: p.read_text() for d in untouched for p in d.iterdir()} == before
    assert carry_over(tmp_path) == []  # nothing left to do the second time
    assert sorted(p.read_text() for p in tenants.rglob("*.jsonl")) == sorted(
        ["new suite\n", "old suite\n", "old other\n", "six\n", "seven\n", "static\n"])  # nothing lost
