"""What recording and replaying cost, and what they keep (providers/cassette_store.py, core/cassette.py): a failure
is recorded by its request's hash, not its request; an append never reads the cassette back; a miss is searched
in a thread, within bounds; `grokgate cassettes prune` and a recording server share a lock, and a line that cannot
be parsed is reported and kept. In-process: the real app over HTTP, a scripted backend.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from grokgate.cli import main as cli_main
from grokgate.core import cassette
from grokgate.core.errors import GatewayError
from grokgate.core.events import Event, Finish
from grokgate.schemas.chat import ChatCompletionRequest
from tests.conftest import TOKEN, err, ok, user
from tests.inproc import ScriptedProvider, app_server, scripted_models

ECHOED_KEY = "sk-live-9f8e7d6c5b4a39281706"


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "grok-3", "messages": user(text), **extra}


def post(srv: Any, body: dict[str, Any], *, timeout: float = 30) -> httpx.Response:
    with srv.client(timeout=timeout) as c:
        return c.post("/grok/chat/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"})


def answer(r: httpx.Response) -> str:
    return str(ok(r)["choices"][0]["message"]["content"])


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


async def _too_long(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
    # An upstream that echoes what it was sent, its own key included, in a refusal.
    raise GatewayError(400, "context_length_exceeded", "This model's maximum context length is 131072 tokens; "
                       f"the request has 1835008 (Authorization: Bearer {ECHOED_KEY}). " + "x" * 5000,
                       param="messages")
    yield Finish(0, "stop")  # pragma: no cover


def test_a_refused_7_mib_prompt_is_recorded_in_a_few_hundred_bytes_and_replays_the_same(tmp_path: Path) -> None:
    """Before: three 7 MiB prompts refused upstream made a 44 MB cassette, and the echoed key was in it."""
    directory = tmp_path / "cassettes"
    huge = [chat(f"{i}: " + "a" * (7 * 1024 * 1024)) for i in range(3)]
    with app_server(tmp_path / "rec", scripted_models(ScriptedProvider("s", script=_too_long)),
                    record_dir=directory, accounts=False) as srv:
        live = [post(srv, body) for body in huge]
    for r in live:
        err(r, 400, "context_length_exceeded", "messages")
    path = directory / "default.jsonl"
    assert path.stat().st_size < 3 * 1600, path.stat().st_size
    recorded = [json.loads(line) for line in lines(path)]
    assert [e["request"] for e in recorded] == [None] * 3
    assert {e["model"] for e in recorded} == {"grok-3"} and all(e["request_bytes"] > 7 * 1024 * 1024 for e in recorded)
    assert ECHOED_KEY not in path.read_text() and "[redacted]" in path.read_text()
    assert all(len(e["error"]["message"]) <= cassette.MESSAGE_CHARS for e in recorded)
    with app_server(tmp_path / "play", None, replay_dir=directory, accounts=False) as srv:
        replayed = post(srv, huge[1])
        error = err(replayed, 400, "context_length_exceeded", "messages")
        assert error["message"] == recorded[1]["error"]["message"]
        # The hash is the key: another prompt of the same size is a miss, told there is nothing to compare with.
        miss = err(post(srv, chat("b" * (7 * 1024 * 1024))), 404, "replay_miss")
        assert "3 recordings" in miss["message"] and "aaaa" not in miss["message"]


def test_an_append_never_reads_the_cassette_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `--record-missing` re-read the whole cassette (on the event loop) after every append."""
    directory = tmp_path / "cassettes"
    with app_server(tmp_path / "rec", scripted_models(ScriptedProvider("s", text="recorded")), record_dir=directory,
                    accounts=False) as srv:
        for i in range(40):
            ok(post(srv, chat(f"question {i}")))
    parsed = [0]
    from_json = cassette.Exchange.from_json.__func__  # type: ignore[attr-defined]

    def counting(cls: type[cassette.Exchange], data: Any) -> cassette.Exchange:
        parsed[0] += 1
        result: cassette.Exchange = from_json(cls, data)
        return result

    live = ScriptedProvider("live", text="fresh")
    with app_server(tmp_path / "fill", scripted_models(live), replay_dir=directory, record_missing=True,
                    accounts=False) as srv:
        assert answer(post(srv, chat("question 3"))) == "recorded"  # the cassette is indexed once
        monkeypatch.setattr(cassette.Exchange, "from_json", classmethod(counting))
        for i in range(3):
            assert answer(post(srv, chat(f"new {i}"))) == "fresh"  # live, appended
            assert answer(post(srv, chat(f"new {i}"))) == "fresh"  # replayed from the line just appended
        assert len(live.requests) == 3
        assert parsed[0] <= 6, parsed  # each replay reads its own line; no append reads the file (before: 120+)
        # Someone else's append (another server, a hand edit) is read, and only it.
        path = directory / "default.jsonl"
        other = json.loads(lines(path)[0])
        other["request"]["messages"][0]["content"] = "from elsewhere"
        other["events"][0]["delta"]["content"] = "external"
        with path.open("a") as f:
            f.write(json.dumps(other) + "\n")
        parsed[0] = 0
        assert answer(post(srv, chat("from elsewhere"))) == "external"
        assert len(live.requests) == 3 and parsed[0] <= 2, parsed
    assert len(lines(directory / "default.jsonl")) == 44


def test_a_miss_is_searched_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a miss compared the request with every recording on the event loop (2,000 recordings and a
    2,048-message request stalled every client 1.83 s). Here the search is held until another client's /healthz
    has been answered: on the event loop, that answer could never come."""
    directory = tmp_path / "cassettes"
    with app_server(tmp_path / "rec", scripted_models(ScriptedProvider("s")), record_dir=directory,
                    accounts=False) as srv:
        ok(post(srv, chat("Say hi")))
    entered, release = threading.Event(), threading.Event()
    search = cassette.nearest

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(20)
        return search(*args, **kwargs)

    monkeypatch.setattr(cassette, "nearest", held)
    with app_server(tmp_path / "play", None, replay_dir=directory, accounts=False) as srv, \
            ThreadPoolExecutor(1) as pool:
        missing = pool.submit(post, srv, chat("Say hello"))
        try:
            assert entered.wait(20)
            with srv.client(timeout=5) as c:
                assert c.get("/healthz").status_code == 200
        finally:
            release.set()
        error = err(missing.result(), 404, "replay_miss", "messages")
        assert '"Say hi"' in error["message"]


def test_a_miss_compares_with_a_bounded_number_of_recent_recordings(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "cassettes"
    with app_server(tmp_path / "rec", scripted_models(ScriptedProvider("s")), record_dir=directory,
                    accounts=False) as srv:
        for i in range(40):
            ok(post(srv, chat(f"question {i}")))
        ok(post(srv, {"model": "grok-4", "messages": user("question 7!")}))
    compared: list[int] = []
    search = cassette.nearest

    def counted(recorded: list[Any], requested: Any, **kwargs: Any) -> Any:
        compared.append(len(recorded))
        return search(recorded, requested, **kwargs)

    monkeypatch.setattr(cassette, "nearest", counted)
    with app_server(tmp_path / "play", None, replay_dir=directory, accounts=False) as srv:
        error = err(post(srv, chat("question 39!")), 404, "replay_miss", "messages")
    assert '"question 39"' in error["message"]  # the nearest recent recording of the same model, not grok-4's
    assert compared and max(compared) <= 16


def test_one_comparison_is_bounded() -> None:
    recorded = {"messages": [{"role": "user", "content": str(i)} for i in range(20_000)]}
    requested = {"messages": [{"role": "user", "content": str(-i)} for i in range(20_000)]}
    assert 0 < len(cassette.differences(recorded, requested, budget=1000)) < 1000
    assert len(cassette.differences(recorded, requested)) <= cassette.COMPARE_NODES  # the default bound
    assert cassette.nearest([recorded, recorded], requested) is not None


def test_prune_while_recording_loses_nothing_and_keeps_an_unparsable_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: prune read, filtered and replaced the file while appends went on (27 of 1,600 exchanges lost over
    8 prunes), and dropped a line it could not parse."""
    directory = tmp_path / "cassettes"
    directory.mkdir()
    path = directory / "default.jsonl"
    broken = '{"v": 1, "request": {"model": "grok-3", "messages": [tr\n'
    path.write_text(broken)
    done = threading.Event()
    prunes = [0]

    def prune_until_done() -> None:
        while not done.is_set():
            assert cli_main(["cassettes", "prune", "--dir", str(directory)]) == 0
            prunes[0] += 1

    with app_server(tmp_path / "rec", scripted_models(ScriptedProvider("s", text="same answer")),
                    record_dir=directory, accounts=False) as srv:
        def writer(w: int) -> None:
            for i in range(25):
                ok(post(srv, chat(f"writer {w} question {i}")))
                ok(post(srv, chat("the duplicate")))  # something for every prune to remove

        pruner = threading.Thread(target=prune_until_done)
        pruner.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(writer, range(8)))
        finally:
            done.set()
            pruner.join()
    assert prunes[0] >= 2
    assert cli_main(["cassettes", "prune", "--dir", str(directory)]) == 0
    kept = path.read_text().splitlines(keepends=True)
    assert kept[0] == broken  # where it was, as it was
    asked = sorted(json.loads(line)["request"]["messages"][0]["content"] for line in kept[1:])
    assert asked == sorted([f"writer {w} question {i}" for w in range(8) for i in range(25)] + ["the duplicate"])
    capsys.readouterr()
    assert cli_main(["cassettes", "list", "--dir", str(directory)]) == 0
    captured = capsys.readouterr()
    assert "line 1 of" in captured.err and "cannot be parsed" in captured.err
    assert cli_main(["cassettes", "show", "default", "--dir", str(directory)]) == 0
    assert "#1 cannot be parsed" in capsys.readouterr().out


def test_the_server_reports_an_unparsable_line_and_replays_the_rest(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "cassettes"
    with app_server(tmp_path / "rec", scripted_models(ScriptedProvider("s", text="kept")), record_dir=directory,
                    accounts=False) as srv:
        ok(post(srv, chat("Say hi")))
    path = directory / "default.jsonl"
    path.write_text("not json at all\n" + path.read_text())
    with caplog.at_level(logging.WARNING, logger="grokgate.replay"), \
            app_server(tmp_path / "play", None, replay_dir=directory, accounts=False) as srv:
        assert answer(post(srv, chat("Say hi"))) == "kept"
    assert any("line 1 " in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    assert path.read_text().startswith("not json at all\n")
