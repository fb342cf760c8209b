"""Edges of record/replay and the response cache a review found (each failed before its fix), in-process."""

from __future__ import annotations

import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from grokgate.core.admission import StaticKeyAdmission
from tests.conftest import TOKEN, create_key, user
from tests.inproc import ScriptedProvider, app_server, scripted_models

CACHED_ROUTING = """
backends: {local: {kind: local}}
models:
  grok-3: [{backend: local}]
cache:
  grok-3: {ttl: 600}
"""


def chat(text: str = "Say hi", **extra: Any) -> dict[str, Any]:
    return {"model": "grok-3", "messages": user(text), **extra}


def post(srv: Any, body: dict[str, Any], token: str = TOKEN, headers: list[tuple[str, bytes]] | None = None
         ) -> httpx.Response:
    with srv.client() as c:
        return c.post("/grok/chat/completions", json=body,
                      headers=[("Authorization", f"Bearer {token}".encode()), *(headers or [])])


def test_a_replay_never_delivers_more_than_its_reservation(tmp_path: Path) -> None:
    """A recording made with no cap (an admin key is held to none) is refused, not replayed past the cap the
    replaying token's reservation paid for (before: 3,000 tokens delivered on a 2-token hold, an overrun)."""
    directory = tmp_path / "c"
    provider = ScriptedProvider("s", text=" ".join(["w"] * 3000))
    with app_server(tmp_path / "rec", scripted_models(provider), record_dir=directory, accounts=False) as srv:
        assert post(srv, chat()).status_code == 200
    with app_server(tmp_path / "play", None, replay_dir=directory, default_output_reservation=2,
                    cassette_scope="shared") as srv:
        token, _ = create_key(srv, "alice", credits="10")
        refused = post(srv, chat(), token=token)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens", refused.text
        with srv.client() as c:
            overruns = [line for line in c.get("/metrics").text.splitlines()
                        if line.startswith("grokgate_settlement_overruns_total{")]
        assert all(line.endswith(" 0.0") for line in overruns), overruns


def test_pure_replay_starts_without_the_routing_files_keys(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    directory.mkdir()
    config = tmp_path / "routing.yaml"
    config.write_text("backends: {x: {kind: xai, api_key_env: K_NOT_SET_ANYWHERE}}\nmodels:\n  grok-3: [{backend: x}]\n"
                      "cache:\n  grok-3: {ttl: 600}\n")
    with app_server(tmp_path / "play", None, replay_dir=directory, config=config, accounts=False) as srv:
        assert srv.client().get("/healthz").status_code == 200


def test_a_cache_does_not_stand_in_front_of_a_replay(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    provider = ScriptedProvider("s", text="first")
    body = chat(temperature=0)
    with app_server(tmp_path / "rec", scripted_models(provider), record_dir=directory, accounts=False) as srv:
        post(srv, body)
        provider.text = "second"
        post(srv, body)
    config = tmp_path / "routing.yaml"
    config.write_text(CACHED_ROUTING)
    with app_server(tmp_path / "play", None, replay_dir=directory, config=config, accounts=False) as srv:
        said = [post(srv, body).json()["choices"][0]["message"]["content"] for _ in range(3)]
    assert said == ["first", "second", "first"]  # in recorded order, then wrapping (before: first x3)


def test_static_keys_are_named_by_a_digest_not_their_place() -> None:
    alice, bob = StaticKeyAdmission(["alice-key"]), StaticKeyAdmission(["bob-key"])
    moved = StaticKeyAdmission(["other", "alice-key"])

    async def ids() -> tuple[str, str, str]:
        return ((await alice.authenticate("Bearer alice-key")).key_id,
                (await bob.authenticate("Bearer bob-key")).key_id,
                (await moved.authenticate("Bearer alice-key")).key_id)

    import asyncio

    a, b, a_moved = asyncio.run(ids())
    assert a != b and a == a_moved
    assert "alice" not in a


def test_two_replicas_with_different_keys_never_share_cached_answers(tmp_path: Path, redis_url: str) -> None:
    """Before: key ids were positions ("key-0"), so bob on replica B got alice's cached answer from replica A."""
    url = redis_url.rsplit("/", 1)[0] + "/11"
    prefix = f"edges-{uuid.uuid4().hex[:8]}:"
    config = tmp_path / "routing.yaml"
    config.write_text(CACHED_ROUTING)
    body = chat("Alice's secret question", temperature=0)
    with ExitStack() as stack:
        a = stack.enter_context(app_server(tmp_path / "a", scripted_models(ScriptedProvider(text="alice's answer")),
                                           config=config, accounts=False, api_keys=["alice-key"], redis_url=url,
                                           redis_key_prefix=prefix))
        b = stack.enter_context(app_server(tmp_path / "b", scripted_models(ScriptedProvider(text="bob's answer")),
                                           config=config, accounts=False, api_keys=["bob-key"], redis_url=url,
                                           redis_key_prefix=prefix))
        assert post(a, body, token="alice-key").headers["x-grokgate-cache"] == "miss"
        r = post(b, body, token="bob-key")
        assert r.headers["x-grokgate-cache"] == "miss"
        assert r.json()["choices"][0]["message"]["content"] == "bob's answer"


@pytest.mark.parametrize("value", [b"ttl=\xb2", b"ttl=\xff", b"ttl=-1", b"ttl=1e3"])
def test_a_bad_cache_header_is_a_400(tmp_path: Path, value: bytes) -> None:
    with app_server(tmp_path / "a", None, accounts=False) as srv:
        r = post(srv, chat(), headers=[("x-grokgate-cache", value)])
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-grokgate-cache", r.text


def test_a_miss_too_large_to_keep_is_not_held_while_it_streams(tmp_path: Path) -> None:
    """Past the bound of one entry a miss stops recording (before: every event was held to the end, then
    refused). The answer is served in full and not cached."""
    config = tmp_path / "routing.yaml"
    config.write_text(CACHED_ROUTING)
    provider = ScriptedProvider(text=" ".join(["word"] * 2000))
    with app_server(tmp_path / "a", scripted_models(provider), config=config, accounts=False,
                    response_cache_max_entry_bytes=1024) as srv:
        body = chat("long", temperature=0)
        first = post(srv, body)
        assert first.headers["x-grokgate-cache"] == "miss"
        assert len(first.json()["choices"][0]["message"]["content"].split()) == 2000
        assert post(srv, body).headers["x-grokgate-cache"] == "miss"  # nothing was kept
        with srv.client() as c:
            metrics = c.get("/metrics").text
    assert 'grokgate_response_cache_total{model="grok-3",result="not_stored"} 2.0' in metrics


def test_a_replay_cut_short_is_billed_its_recorded_usage() -> None:
    """A client that reads a replay's events but hangs up before its usage report was billed nothing (the replay
    kept no count of its own); now the recorded usage, once the replay began. Not begun: nothing used."""
    import asyncio

    from grokgate.core.cassette import Exchange, encode_event
    from grokgate.core.events import Delta, Finish, Usage, UsageReport
    from grokgate.providers.recording import ReplayGeneration

    recorded = Usage(prompt_tokens=7, completion_tokens=2)
    events = [encode_event(e, 0) for e in (Delta(0, "hi"), Delta(0, " there"), Finish(0, "stop"),
                                            UsageReport(recorded))]
    exchange = Exchange(key="k", request={}, backend="up", fingerprint="fp", events=events)

    async def run() -> None:
        unstarted = ReplayGeneration(exchange, None, "instant")
        await unstarted.aclose()
        assert unstarted.usage_so_far() is None
        cut = ReplayGeneration(exchange, None, "instant")
        assert await cut.__anext__() == Delta(0, "hi")
        await cut.aclose()
        assert cut.usage_so_far() == recorded

    asyncio.run(run())
