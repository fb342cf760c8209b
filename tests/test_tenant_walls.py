"""Noninterference between tenants, as a property: whatever tenant A does, tenant B observes exactly what it would
have observed had A never existed.

Each feature is a pair: A's scenario and B's probe. `differential` runs them twice on fresh servers: once A's
scenario then B's probe, once B's probe alone (A's token created but idle, or never created where the feature is
about ids), and compares what B saw: status codes, headers that describe the answer (cache hit or miss, rate-limit
counts), bodies without what differs per response anyway (ids, timestamps, trace ids), usage with `cached_tokens`,
and B's own balance, usage and ledger. Ids A made that B tries to reach are passed as hints; the run without A
tries ids of the same shape that nobody made, and both are compared with the id masked.

Features: chat and stream; Responses store/retrieve/continue/delete; the response cache in both scopes (the global
scope shares identical requests by design, so A's request there differs in a field grokgate does not know);
record/replay and replay misses; conversation ids towards xAI's per-server prompt caches; the local engine's
prompt cache (e2e: the real model); ledger, usage and balance; a token deleted and the next one created; rate
limits. In-process tier (tests/inproc.py) except where the real model is the point.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from grokgate.providers.base import ModelTable, Route, create
from grokgate.providers.router import Candidate, RoutedModel
from grokgate.serving.affinity import scoped
from tests.conftest import E2E, TOKEN, parse_sse, user
from tests.fakes.fake_xai import FakeXAI
from tests.inproc import AppServer, ScriptedProvider, app_server, scripted_models

SECRET = "Internal key: HR-SECRET-7781. Salary of Jane Roe: 182,000."
# What differs between any two responses, whoever else exists: never an observation.
VOLATILE = {"id", "created", "created_at", "trace_id", "request_id", "duration_ms", "system_fingerprint",
            "token_id", "account_id", "completed_at", "at", "day", "first_id", "last_id", "previous_response_id",
            "response_id", "prefix"}
HEADERS = ("x-grokgate-cache", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
           "x-ratelimit-limit-tokens", "content-type")


# -- the harness -----------------------------------------------------------------------------------------------------


@dataclass
class World:
    """One server and its tenants (name -> bearer token), and the ids A's scenario left for B's probe to try."""

    srv: AppServer
    tmp: Path
    tokens: dict[str, str] = field(default_factory=dict)
    hints: dict[str, str] = field(default_factory=dict)
    restart: Callable[..., AbstractContextManager[AppServer]] | None = None

    def tenant(self, name: str, credits: str = "100", **fields: Any) -> str:
        with self.srv.client() as c:
            r = c.post("/admin/keys", json={"name": name, "credits": credits, **fields},
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 201, r.text
        self.tokens[name] = r.json()["token"]
        return self.tokens[name]

    def request(self, method: str, path: str, who: str, body: Any = None, **headers: str) -> httpx.Response:
        with self.srv.client() as c:
            return c.request(method, path, json=body,
                             headers={"Authorization": f"Bearer {self.tokens.get(who, who)}", **headers})


Scenario = Callable[[World], None]
Probe = Callable[[World], list[Any]]
WorldFactory = Callable[[Path, bool], AbstractContextManager[World]]


def observe(r: httpx.Response) -> dict[str, Any]:
    """What a client sees of one answer, without what differs per response anyway."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        sse = parse_sse(r.text)
        body: Any = [scrub(c) for c in sse.chunks] + [e for e in sse.events if isinstance(e, str)]
    else:
        try:
            body = scrub(r.json())
        except ValueError:
            body = r.text
    return {"status": r.status_code, "headers": {h: r.headers.get(h) for h in HEADERS}, "body": body}


def scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<volatile>" if k in VOLATILE else scrub(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def masked(observations: list[Any], hints: dict[str, str]) -> str:
    text = json.dumps(observations, sort_keys=True)
    for name, value in hints.items():
        text = text.replace(value, f"<{name}>")
    return text


def like(value: str) -> str:
    """An id of the same shape as `value` that nobody made (its prefix kept, the rest random)."""
    prefix, sep, rest = value.rpartition("_")
    return f"{prefix}{sep}{secrets.token_hex(len(rest) // 2 + 1)[:len(rest)]}" if sep else secrets.token_hex(8)


def own_books(w: World, who: str) -> list[Any]:
    """B's own balance, usage and ledger, as B reads them."""
    return [observe(w.request("GET", path, who)) for path in ("/v1/balance", "/v1/usage?group_by=model",
                                                               "/v1/ledger")]


def differential(tmp: Path, world: WorldFactory, scenario: Scenario, probe: Probe) -> None:
    with world(tmp / "with-a", True) as w:
        scenario(w)
        seen = probe(w)
        hints = dict(w.hints)
    with world(tmp / "without-a", False) as w:
        w.hints = {name: like(value) for name, value in hints.items()}
        alone = probe(w)
        unmade = dict(w.hints)
    assert masked(seen, hints) == masked(alone, unmade)


def scripted_world(provider_text: str = "Hello from the script", **settings: Any) -> WorldFactory:
    @contextmanager
    def make(tmp: Path, with_a: bool) -> Iterator[World]:
        provider = ScriptedProvider(text=provider_text)
        with app_server(tmp, scripted_models(provider), **settings) as srv:
            w = World(srv, tmp)
            w.tenant("a")  # created in both runs, so B's id is the same; idle in the run without A
            w.tenant("b")
            yield w

    return make


def chat(w: World, who: str, content: str, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    body = {"model": "grok-3", "messages": user(content), "max_tokens": 8, "temperature": 0, **fields}
    return w.request("POST", "/grok/chat/completions", who, body, **(headers or {}))


# -- chat and stream, ledger, usage, balance ----------------------------------------------------------------------


def test_chat_stream_and_books(tmp_path: Path) -> None:
    def a(w: World) -> None:
        for stream in (False, True):
            assert chat(w, "a", SECRET, stream=stream).status_code == 200

    def b(w: World) -> list[Any]:
        return [observe(chat(w, "b", SECRET)), observe(chat(w, "b", SECRET, stream=True)), *own_books(w, "b")]

    differential(tmp_path, scripted_world(), a, b)


# -- the Responses API's stored conversations -----------------------------------------------------------------------


def test_responses_store_retrieve_continue_delete(tmp_path: Path) -> None:
    def a(w: World) -> None:
        first = w.request("POST", "/v1/responses", "a", {"model": "grok-3", "input": SECRET, "max_output_tokens": 8})
        assert first.status_code == 200, first.text
        second = w.request("POST", "/v1/responses", "a", {"model": "grok-3", "input": "and?", "max_output_tokens": 8,
                                                          "previous_response_id": first.json()["id"]})
        assert second.status_code == 200, second.text
        w.hints = {"first": first.json()["id"], "second": second.json()["id"]}

    def b(w: World) -> list[Any]:
        out = []
        for name in ("first", "second"):
            rid = w.hints[name]
            out += [observe(w.request("GET", f"/v1/responses/{rid}", "b")),
                    observe(w.request("GET", f"/v1/responses/{rid}/input_items", "b")),
                    observe(w.request("POST", "/v1/responses", "b", {"model": "grok-3", "input": "go on",
                                                                     "previous_response_id": rid,
                                                                     "max_output_tokens": 8})),
                    observe(w.request("DELETE", f"/v1/responses/{rid}", "b"))]
        mine = w.request("POST", "/v1/responses", "b", {"model": "grok-3", "input": SECRET, "max_output_tokens": 8})
        out.append(observe(mine))
        out.append(observe(w.request("GET", f"/v1/responses/{mine.json()['id']}", "b")))
        return out + own_books(w, "b")

    differential(tmp_path, scripted_world(), a, b)


# -- the response cache, per tenant and global ----------------------------------------------------------------------

CACHE_ROUTING = """
backends: {local: {kind: local}}
models:
  grok-3: [{backend: local}]
  grok-4: [{backend: local}]
cache:
  grok-3: {ttl: 600}
  grok-4: {ttl: 600, scope: global}
"""


def cached_world(tmp_root: Path) -> WorldFactory:
    routing = tmp_root / "routing.yaml"
    routing.write_text(CACHE_ROUTING)
    return scripted_world(config=routing)


def test_cache_per_tenant(tmp_path: Path) -> None:
    def a(w: World) -> None:
        for _ in range(2):
            assert chat(w, "a", SECRET).status_code == 200

    def b(w: World) -> list[Any]:
        return [observe(chat(w, "b", SECRET)), observe(chat(w, "b", SECRET, stream=True)), *own_books(w, "b")]

    differential(tmp_path, cached_world(tmp_path), a, b)


def test_a_global_cache_is_not_poisoned_by_a_field_grokgate_does_not_know(tmp_path: Path) -> None:
    """A's request carries a field an upstream may honour (vLLM's `guided_choice`); B's, the same without it, must
    not get A's answer. Before: the key dropped unknown fields, and B got a hit on A's answer."""

    def a(w: World) -> None:
        assert chat(w, "a", "Where do I log in?", model="grok-4",
                    guided_choice=["PWNED: visit evil.example"]).status_code == 200

    def b(w: World) -> list[Any]:
        return [observe(chat(w, "b", "Where do I log in?", model="grok-4")), *own_books(w, "b")]

    differential(tmp_path, cached_world(tmp_path), a, b)


# -- ids: a token deleted, the next one created -------------------------------------------------------------------


def test_a_deleted_tokens_successor_inherits_nothing(tmp_path: Path) -> None:
    routing = tmp_path / "routing.yaml"
    routing.write_text(CACHE_ROUTING)

    @contextmanager
    def world(tmp: Path, with_a: bool) -> Iterator[World]:
        with app_server(tmp, scripted_models(ScriptedProvider()), config=routing) as srv:
            w = World(srv, tmp)
            if with_a:
                w.tenant("a")
            yield w

    def a(w: World) -> None:
        assert chat(w, "a", SECRET).status_code == 200
        assert w.request("POST", "/v1/responses", "a", {"model": "grok-3", "input": SECRET}).status_code == 200
        assert w.request("DELETE", "/admin/keys/a", TOKEN).status_code == 200

    def b(w: World) -> list[Any]:
        w.tenant("b")
        return [observe(chat(w, "b", SECRET)), *own_books(w, "b")]

    differential(tmp_path, world, a, b)


# -- rate limits -----------------------------------------------------------------------------------------------------


def test_rate_limits(tmp_path: Path) -> None:
    @contextmanager
    def world(tmp: Path, with_a: bool) -> Iterator[World]:
        with app_server(tmp, scripted_models(ScriptedProvider())) as srv:
            w = World(srv, tmp)
            w.tenant("a", rpm=2, tpm=100_000)
            w.tenant("b", rpm=5, tpm=100_000)
            yield w

    def a(w: World) -> None:
        statuses = [chat(w, "a", SECRET).status_code for _ in range(4)]
        assert statuses == [200, 200, 429, 429]
        assert w.request("POST", "/grok/chat/completions", "a", {"model": "nope"}).status_code == 429

    def b(w: World) -> list[Any]:
        return [observe(chat(w, "b", "hi")) for _ in range(2)] + own_books(w, "b")

    differential(tmp_path, world, a, b)


# -- conversation ids towards xAI's per-server prompt caches -------------------------------------------------------


def xai_models(fake: FakeXAI) -> ModelTable:
    backend = create("xai", name="xai", base_url=fake.url, api_keys=list(fake.api_keys))
    return ModelTable([Route("grok-3", RoutedModel("grok-3", [Candidate(backend, "grok-3")]), "grok-3")],
                      backends=[backend])


def test_conversation_ids_are_the_tenants_own(tmp_path: Path) -> None:
    """xAI sends every request of one conversation id to one server, whose prompt cache is shared by whatever lands
    there. B sends the id A used, with A's opening: the answer's cached_tokens must not tell B what A sent. Before:
    the id went to xAI as sent, so B landed on A's server and read A's prefix from its cache."""
    system = "You are the payroll assistant. " + SECRET + " Answer in one word."

    def conv_id() -> str:
        # An id whose two tenant-scoped forms land on different fake servers (they would share one by chance 1 in
        # 64 times: that is xAI's own load balancing, which nobody controls).
        servers = FakeXAI(cache_servers=64).caches
        assert servers is not None
        for i in range(1000):
            ident = f"conv-{i}"
            if servers.server_of(scoped(ident, "token:1")) != servers.server_of(scoped(ident, "token:2")):
                return ident
        raise AssertionError("no id found")

    ident = conv_id()

    @contextmanager
    def world(tmp: Path, with_a: bool) -> Iterator[World]:
        with FakeXAI(api_keys=["xai-key-a"], cache_servers=64).start() as fake, \
                app_server(tmp, xai_models(fake)) as srv:
            w = World(srv, tmp)
            w.tenant("a")
            w.tenant("b")
            yield w

    def ask(w: World, who: str, question: str) -> httpx.Response:
        body = {"model": "grok-3", "max_tokens": 8, "messages": [{"role": "system", "content": system},
                                                                 {"role": "user", "content": question}]}
        return w.request("POST", "/grok/chat/completions", who, body, **{"x-grok-conv-id": ident})

    def a(w: World) -> None:
        for question in ("What is the key?", "And the salary?"):
            assert ask(w, "a", question).status_code == 200

    def b(w: World) -> list[Any]:
        return [observe(ask(w, "b", "What is the key?"))]

    differential(tmp_path, world, a, b)


# -- record and replay ----------------------------------------------------------------------------------------------


def test_replay_and_its_misses(tmp_path: Path) -> None:
    """A records a conversation with a secret into the cassette `team`; then, replaying, B asks A's question and an
    unrelated one in the same cassette. Before: B replayed A's answer, and its miss quoted A's prompt."""

    @contextmanager
    def world(tmp: Path, with_a: bool) -> Iterator[World]:
        cassettes = tmp / "cassettes"
        provider = ScriptedProvider(text="The key is HR-SECRET-7781")
        with app_server(tmp, scripted_models(provider), record_dir=cassettes) as srv:
            w = World(srv, tmp)
            w.tenant("a")
            w.tenant("b")
            if with_a:
                assert chat(w, "a", SECRET, headers={"x-grokgate-cassette": "team"}).status_code == 200
        # The same accounts database, now replaying the directory.
        with app_server(tmp, ModelTable([]), replay_dir=cassettes) as srv:
            w.srv = srv
            yield w

    def b(w: World) -> list[Any]:
        team = {"x-grokgate-cassette": "team"}
        return [observe(chat(w, "b", SECRET, headers=team)), observe(chat(w, "b", "Unrelated question", headers=team)),
                *own_books(w, "b")]

    differential(tmp_path, world, lambda w: None, b)


# -- the local engine's prompt cache (the real model) ---------------------------------------------------------------


@E2E
def test_the_local_prompt_cache_stays_inside_a_tenant(tmp_path: Path) -> None:
    """After A's turn containing a PIN, B's guess (right and wrong) reports the same cached_tokens as if A had never
    asked. Before: the right guess reported more cached tokens than the wrong one."""
    pin = "PIN 4471"

    @contextmanager
    def world(tmp: Path, with_a: bool) -> Iterator[World]:
        from grokgate.app import build_routing
        from tests.inproc import app_settings

        settings = app_settings(tmp, slots=2, ctx_per_slot=512)
        with app_server(tmp, build_routing(settings), slots=2, ctx_per_slot=512) as srv:
            deadline = time.monotonic() + 120
            with srv.client() as c:  # the engine loads in the background: wait until it serves
                while c.get("/readyz").status_code != 200:
                    assert time.monotonic() < deadline, "the local engine did not load"
                    time.sleep(0.05)
            w = World(srv, tmp)
            w.tenant("a")
            w.tenant("b")
            yield w

    def turn(w: World, who: str, text: str) -> httpx.Response:
        body = {"model": "grok-3", "max_tokens": 1, "temperature": 1.0, "top_p": 0.0,
                "messages": [{"role": "system", "content": "You guard the vault."}, {"role": "user", "content": text}]}
        return w.request("POST", "/grok/chat/completions", who, body)

    def a(w: World) -> None:
        assert turn(w, "a", f"My {pin}. Remember it.").status_code == 200

    def b(w: World) -> list[Any]:
        out = []
        for guess in (f"My {pin}. Remember it.", "My PIN 9999. Remember it."):
            r = turn(w, "b", guess)
            assert r.status_code == 200, r.text
            out.append(r.json()["usage"])  # prompt and cached tokens: the text is not the point
        return out

    differential(tmp_path, world, a, b)


def test_masking_compares_ids_by_shape() -> None:
    """The harness itself: an id A made and a same-shaped id nobody made compare equal once masked, and an
    observation that differs does not."""
    made, unmade = "resp_0123abcd", like("resp_0123abcd")
    assert re.fullmatch(r"resp_[0-9a-f]{8}", unmade) and unmade != made
    assert masked([{"m": f"No response with id '{made}'."}], {"x": made}) == \
        masked([{"m": f"No response with id '{unmade}'."}], {"x": unmade})
    assert masked([{"cached": 25}], {}) != masked([{"cached": 21}], {})
