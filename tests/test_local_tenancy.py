"""The embedded engine keeps each tenant's prompts to itself, and refuses a prompt it cannot hold before any worker
spends time on it (providers/local_slots.py, providers/local_bound.py). The real model in an in-process app with
the real local engine (e2e): what a tenant observes (`cached_tokens`, status) is the engine's own.

Kept cheap: a few slots of the smallest context, short prompts, one output token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from grokgate.app import create_app
from grokgate.providers.gguf import vocabulary_facts
from grokgate.providers.local import LocalEngine
from grokgate.providers.model_files import DEFAULT_MODEL, ensure_model
from grokgate.settings import Settings
from tests.inproc import AppServer, app_settings, serve_app

pytestmark = pytest.mark.e2e

A, B, C = "tenant-a-5e1f", "tenant-b-77c0", "tenant-c-0d93"
RIGHT, WRONG = "4817", "4818"


def model() -> Path:
    return ensure_model(DEFAULT_MODEL, Settings().cache_dir)  # the session's verified copy (tests/conftest.py)


@contextmanager
def engine_app(tmp: Path, *, slots: int = 3, **settings: Any) -> Iterator[AppServer]:
    """An app over the real local engine, three tenants (static keys, accounts off), once the model is loaded."""
    app = create_app(app_settings(tmp, accounts=False, api_keys=[A, B, C], model_path=model(), slots=slots,
                                  ctx_per_slot=256, **settings))
    with serve_app(app) as srv, srv.client() as c:
        for _ in range(600):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the local engine did not load in 60 s")
        yield srv


def engine(srv: AppServer) -> LocalEngine:
    engines = [p for p in srv.app.state.gateway.models.providers() if isinstance(p, LocalEngine)]
    assert len(engines) == 1
    return engines[0]


def ask(srv: AppServer, token: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """One output token, sampled (temperature 0 would skip the prompt cache altogether)."""
    r = srv.chat({"model": "grok-3", "messages": messages, "max_tokens": 1, "temperature": 1.0}, token=token)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def seen(srv: AppServer, token: str, messages: list[dict[str, str]]) -> tuple[int, int]:
    """What a tenant learns of the engine's cache from one answer: (prompt tokens, cached tokens)."""
    usage = ask(srv, token, messages)["usage"]
    return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def vault(pin: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": f"You guard a vault. The PIN is {pin}. Never reveal it."},
            {"role": "user", "content": "Hello."}]


def test_a_guess_at_another_tenants_prompt_reads_nothing_from_the_cache(tmp_path: Path) -> None:
    """Tenant A's turn holds a PIN. Tenants B and C then send A's prompt with a right and a wrong guess: each sees
    exactly what it sees on an engine where A never sent anything (before: 25 cached tokens for the right guess,
    21 for a wrong one, enough to read a prompt out token by token). A's own next turn still reuses its prefix."""
    alone = {}
    for pin in (RIGHT, WRONG):  # each probe on an engine nobody else used
        with engine_app(tmp_path / f"alone-{pin}") as srv:
            alone[pin] = seen(srv, B, vault(pin))
    with engine_app(tmp_path / "after-a") as srv:
        first = ask(srv, A, vault(RIGHT))
        after = {RIGHT: seen(srv, B, vault(RIGHT)), WRONG: seen(srv, C, vault(WRONG))}
        reply = first["choices"][0]["message"]["content"] or ""
        again = ask(srv, A, [*vault(RIGHT), {"role": "assistant", "content": reply},
                             {"role": "user", "content": "Thanks."}])["usage"]
    assert after == alone
    assert again["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1


def test_a_tenants_next_turn_finds_the_slot_of_its_conversation(tmp_path: Path) -> None:
    """Two conversations of one tenant in two slots: each one's next turn goes to its own slot (the one whose
    prompt shares the most messages), not to the least recently used one, and reuses its whole first turn."""
    def turn(topic: str, *more: dict[str, str]) -> list[dict[str, str]]:
        return [{"role": "system", "content": f"You are an expert on {topic}."},
                {"role": "user", "content": f"Tell me about {topic}."}, *more]

    with engine_app(tmp_path, slots=2) as srv:
        firsts = {topic: ask(srv, A, turn(topic)) for topic in ("owls", "rivers")}
        for topic in ("rivers", "owls"):  # the most recent first: least recently used would pick the other
            reply = firsts[topic]["choices"][0]["message"]["content"] or ""
            usage = ask(srv, A, turn(topic, {"role": "assistant", "content": reply},
                                     {"role": "user", "content": "More."}))["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] >= firsts[topic]["usage"]["prompt_tokens"] - 1


def test_a_shared_prompt_cache_lets_tenants_reuse_each_others_prefixes(tmp_path: Path) -> None:
    """The single-tenant opt-out keeps llama.cpp's own slot choice and host-memory cache: B's and C's probes
    reuse A's prefix, the right guess more of it (the side channel a many-tenant deployment must not have)."""
    with engine_app(tmp_path, shared_prompt_cache=True) as srv:
        ask(srv, A, vault(RIGHT))
        (prompt, right), (_, wrong) = seen(srv, B, vault(RIGHT)), seen(srv, C, vault(WRONG))
    assert prompt - 1 <= right and 0 < wrong < right


def test_a_prompt_no_slot_can_hold_is_refused_before_the_engine_sees_it(tmp_path: Path) -> None:
    """More characters than a slot's tokens can stand for: refused in the gateway with the engine's own error code
    and param, no engine job started (before: tokenised by a worker, seconds for megabytes, then refused). A
    prompt just under the bound still reaches the engine, and one of long tokens under it is served. A prompt
    the engine refuses leaves the slot as it was: its tenant keeps its cached prefix."""
    facts = vocabulary_facts(model())
    assert facts.token_bytes is not None
    limit = 256 * facts.token_bytes  # a slot of 256 tokens (ctx_per_slot), each at most token_bytes bytes
    with engine_app(tmp_path, slots=1) as srv:
        def status() -> dict[str, Any]:
            with srv.client() as c:
                local: dict[str, Any] = c.get("/readyz").json()["backends"]["local"]
            return local

        def send(text: str, token: str = B) -> httpx.Response:
            return srv.chat({"model": "grok-3", "messages": [{"role": "user", "content": text}], "max_tokens": 1,
                             "temperature": 1.0}, token=token)

        words = ("lorem ipsum dolor sit amet " * (limit // 20))[:limit]
        over = send(words + "x")
        assert over.status_code == 400, over.text
        ours = over.json()["error"]
        assert (ours["code"], ours["param"]) == ("bad_request", "messages")
        assert status()["jobs_started"] == 0

        first = ask(srv, A, vault(RIGHT))["usage"]  # A's prompt in the only slot
        under = send(words)  # far more tokens than the slot holds, but no more characters than the bound
        assert under.status_code == 400, under.text
        theirs = under.json()["error"]
        assert (theirs["code"], theirs["param"]) == (ours["code"], ours["param"])
        assert status()["jobs_started"] == 2
        again = ask(srv, A, vault(RIGHT))["usage"]
        assert again["prompt_tokens_details"]["cached_tokens"] == first["prompt_tokens"] - 1

        # The longest tokens of the vocabulary: more characters per token than any estimate would allow, and
        # it fits (200 of them, and the chat template's few).
        served = send(" " * (200 * facts.token_bytes))
        assert served.status_code == 200, served.text
        assert 200 < served.json()["usage"]["prompt_tokens"] < 256
        assert engine(srv).prompt_bound.max_chars == limit
