"""Per tenant, the embedded engine keeps the prefixes evicted from its slots for the tenant that made them, and
restores them for that tenant only (providers/local_cache.py). The index offline; the rest on the real model in an
in-process app (e2e), kept cheap like tests/test_local_tenancy.py: one slot of the smallest context, short prompts,
one output token, greedy through `top_p: 0` (temperature 0 would skip the prompt cache altogether)."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from grokgate.providers import local_cache
from grokgate.providers.local_cache import PREFIX, SavedStates, private_directory
from grokgate.providers.local_slots import SlotTable
from tests.test_local_tenancy import RIGHT, WRONG, A, B, C, engine, engine_app, vault

E2E = pytest.mark.e2e

# -- the index (offline) --------------------------------------------------------------------------------------------

X1, X2, X3, Y1 = (b"x1",), (b"x1", b"x2"), (b"x1", b"x2", b"x3"), (b"y1",)


def saved(states: SavedStates, tenant: str, messages: tuple[bytes, ...], size: int) -> str:
    """A state as the engine leaves it: a file of `size` bytes, then indexed."""
    name = states.new_name()
    (states.directory / name).write_bytes(b"\0" * size)
    states.add(tenant, messages, name, size)
    return name


def on_disk(states: SavedStates) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in states.directory.iterdir()}


def test_saved_states_stay_within_their_byte_bound_least_recently_used_first(tmp_path: Path) -> None:
    states = SavedStates(tmp_path, limit=1000)
    a = saved(states, "A", X1, 400)
    saved(states, "B", Y1, 400)
    found, _ = states.best("A", X2)
    assert found is not None
    states.touch(found)  # restored: A's is now the most recently used
    c = saved(states, "C", X1, 400)  # 1,200 bytes: the least recently used, B's, goes
    assert on_disk(states) == {a: 400, c: 400} and states.bytes == 800 and len(states) == 2
    saved(states, "A", Y1, 1001)  # alone more than the bound: deleted at once, the others kept
    assert on_disk(states) == {a: 400, c: 400} and states.bytes == 800
    d = saved(states, "B", Y1, 1000)
    assert on_disk(states) == {d: 1000} and states.bytes == 1000


def test_a_lookup_finds_only_the_asking_tenants_states_and_a_longer_state_replaces_its_prefix(tmp_path: Path) -> None:
    states = SavedStates(tmp_path, limit=10_000)
    x2 = saved(states, "A", X2, 10)
    assert states.best("B", X3) == (None, 0)  # the same messages, another tenant: nothing
    assert not states.covers("B", X1)
    found, shared = states.best("A", X3)
    assert found is not None and (found.name, shared) == (x2, 2)
    assert states.covers("A", X1) and states.covers("A", X2) and not states.covers("A", X3)
    assert states.best("A", Y1) == (None, 0)  # no message in common
    x3 = saved(states, "A", X3, 10)  # gives every prompt at least what X2 gave: X2's file goes
    assert set(on_disk(states)) == {x3} and states.bytes == 10
    found, shared = states.best("A", X2)
    assert found is not None and (found.name, shared) == (x3, 2)
    states.drop(found)
    assert on_disk(states) == {} and states.best("A", X2) == (None, 0)


def test_an_own_slot_sharing_fewer_messages_than_a_saved_state_is_passed_over() -> None:
    """The tenant's best saved state shares 2 messages: its own slot sharing 1 is kept (its prefix may serve another
    conversation's next turn), and the least recently used slot gets the saved state; a slot sharing as many wins."""
    table = SlotTable(2)
    for tenant, prompt in (("B", Y1), ("A", X1)):
        slot, _ = table.take(tenant, prompt)
        table.give_back(slot, tenant, prompt, evaluated=True)
    slot, own = table.take("A", X3, saved=2)
    assert (slot.id, own) == (0, False)  # B's, the least recently used, not A's sharing 1
    table.hold(slot, "A", X2)  # the saved state restored into it (providers/local_cache.py)
    table.give_back(slot, "A", X3, evaluated=True)
    slot, own = table.take("A", X3, saved=2)
    assert (slot.id, own) == (0, True)  # shares 3: nothing to restore
    table.give_back(slot, "A", X3, evaluated=True)
    slot, own = table.take("A", X2, saved=2)
    assert (slot.id, own) == (0, True)  # as many as the saved state: the slot wins the tie


def test_saved_states_go_to_a_private_directory_and_a_dead_engines_are_removed(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """On tmpfs when it has room for the bound (else the temporary directory), 0700; directories left by engines
    whose process is gone are removed, those of live processes and anything else kept."""
    monkeypatch.setattr(local_cache, "TMPFS", tmp_path)
    done = subprocess.Popen(["true"])
    done.wait()  # reaped: its process id is free again
    dead = tmp_path / f"{PREFIX}{done.pid}-a1"
    dead.mkdir()
    (dead / "00000001.bin").write_bytes(b"state")
    kept = [tmp_path / f"{PREFIX}{os.getppid()}-b2", tmp_path / f"{PREFIX}{os.getpid()}-c3", tmp_path / f"{PREFIX}x"]
    for path in kept:
        path.mkdir()
    new = private_directory(1 << 20)
    assert new.parent == tmp_path and stat.S_IMODE(new.stat().st_mode) == 0o700
    assert not dead.exists() and all(path.exists() for path in kept)
    roomless = private_directory(1 << 62)  # more than any tmpfs holds
    assert roomless.parent == Path(tempfile.gettempdir())
    roomless.rmdir()


# -- the real model -------------------------------------------------------------------------------------------------


def ask(srv: Any, token: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": "grok-3", "messages": messages, "max_tokens": 1, "temperature": 1.0, "top_p": 0.0}
    r = srv.chat(body, token=token)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def usage(answer: dict[str, Any]) -> tuple[int, int]:
    u = answer["usage"]
    return u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]


def more(first: list[dict[str, str]], answer: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation's next turn."""
    return [*first, {"role": "assistant", "content": answer["choices"][0]["message"]["content"] or ""},
            {"role": "user", "content": "Go on."}]


def topic(name: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": f"You are an expert on {name}. Answer in one short sentence."},
            {"role": "user", "content": f"Tell me about {name}."}]


@E2E
def test_a_conversation_evicted_from_its_slot_gets_its_prefix_back(tmp_path: Path) -> None:
    """One slot. Tenant A's conversation on owls is evicted by its own conversation on rivers, that one by tenant
    B's: the next turn of each of A's conversations reuses its whole first turn, restored from A's saved states
    (before: 0 cached tokens, the prefix evaluated again)."""
    with engine_app(tmp_path, slots=1) as srv:
        owls = ask(srv, A, topic("owls"))
        rivers = ask(srv, A, topic("rivers"))
        ask(srv, B, topic("tides"))
        for first, answer in ((topic("owls"), owls), (topic("rivers"), rivers)):
            prompt, cached = usage(ask(srv, A, more(first, answer)))
            assert prompt > usage(answer)[0] and cached >= usage(answer)[0] - 1, (prompt, cached)
        cache = engine(srv).tenant_cache
        assert cache is not None and cache.restores == 2 and cache.failures == 0


@E2E
def test_another_tenant_sending_a_saved_prompt_restores_nothing(tmp_path: Path) -> None:
    """Tenant A's turn holds a PIN and is evicted (saved) by tenant C's. Tenant B then sends A's prompt, with the
    right PIN and a wrong one: it sees exactly what it sees on an engine where A never sent anything. A's own next
    turn then restores it: the state was there to be had."""
    def probe(srv: Any) -> list[tuple[int, int]]:
        return [usage(ask(srv, B, vault(pin))) for pin in (RIGHT, WRONG)]

    with engine_app(tmp_path / "alone", slots=1) as srv:
        alone = probe(srv)
    with engine_app(tmp_path / "after-a", slots=1) as srv:
        first = ask(srv, A, vault(RIGHT))
        ask(srv, C, topic("tides"))
        after = probe(srv)
        _, again = usage(ask(srv, A, more(vault(RIGHT), first)))
    assert after == alone
    assert again >= usage(first)[0] - 1


@E2E
def test_a_failing_save_or_restore_still_serves_the_request(tmp_path: Path) -> None:
    """A saved file gone (the engine refuses to restore it), then the engine's socket gone (every save and restore
    fails): each request is answered, with a fresh evaluation where its restore failed."""
    with engine_app(tmp_path, slots=1) as srv:
        local = engine(srv)
        cache = local.tenant_cache
        assert cache is not None and local._socket_dir is not None
        owls = ask(srv, A, topic("owls"))
        tides = ask(srv, B, topic("tides"))  # A's owls saved
        assert cache.saves == 1
        for name in os.listdir(cache.states.directory):
            os.unlink(cache.states.directory / name)
        assert usage(ask(srv, A, more(topic("owls"), owls)))[1] == 0  # B's tides saved; A's file refused
        assert (cache.saves, cache.restores, cache.failures) == (2, 0, 1)

        os.unlink(Path(local._socket_dir) / "llama.sock")
        ask(srv, C, topic("hills"))  # saving A's owls fails
        assert usage(ask(srv, B, more(topic("tides"), tides)))[1] == 0  # restoring B's tides fails
        # (and saving C's hills before it)
        assert (cache.saves, cache.restores, cache.failures) == (2, 0, 4)
