"""The rules behind the engine's tenant walls, offline (no model): which slot a job may reuse
(providers/local_slots.py), how many bytes a token stands for (providers/gguf.py) and the prompt bound
(providers/local_bound.py). tests/test_local_tenancy.py shows them on the real model."""

from __future__ import annotations

import asyncio
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from grokgate.core.errors import GatewayError
from grokgate.providers.base import Call
from grokgate.providers.gguf import GGUFError, read_metadata, vocabulary_facts
from grokgate.providers.local import LocalEngine, _Job
from grokgate.providers.local_bound import UNREAD_TOKEN_BYTES, PromptBound, message_chars, slot_tokens
from grokgate.providers.local_slots import SlotTable, TenantLane
from grokgate.schemas.chat import ChatCompletionRequest

# -- a GGUF file's metadata, written as the format says (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def _value(value: Any) -> tuple[int, bytes]:
    if isinstance(value, (str, bytes)):
        return 8, _string(value)
    if isinstance(value, bool):
        return 7, struct.pack("<?", value)
    if isinstance(value, int):
        return 4, struct.pack("<I", value)
    if isinstance(value, float):
        return 6, struct.pack("<f", value)
    assert isinstance(value, list)
    if value and isinstance(value[0], (str, bytes)):
        return 9, struct.pack("<IQ", 8, len(value)) + b"".join(_string(v) for v in value)
    return 9, struct.pack("<IQ", 5, len(value)) + struct.pack(f"<{len(value)}i", *value)


def write_gguf(path: Path, metadata: dict[str, Any], version: int = 3) -> Path:
    out = b"GGUF" + struct.pack("<IQQ", version, 0, len(metadata))
    for key, value in metadata.items():
        kind, data = _value(value)
        out += _string(key) + struct.pack("<I", kind) + data
    path.write_bytes(out)
    return path


def vocabulary(tokenizer: str, tokens: list[str], types: list[int]) -> dict[str, Any]:
    return {"general.architecture": "toy", "general.name": "x" * 40, "toy.context_length": 300,
            "tokenizer.ggml.model": tokenizer, "tokenizer.ggml.merges": ["a b", "ab c"], "toy.rope.scale": 1.5,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types}


def test_a_byte_level_token_stands_for_one_byte_per_character(tmp_path: Path) -> None:
    def longest(tokens: list[str], types: list[int]) -> int | None:
        facts = vocabulary_facts(write_gguf(tmp_path / "m.gguf", vocabulary("gpt2", tokens, types)))
        assert (facts.tokenizer, facts.context_length) == ("gpt2", 300)
        return facts.token_bytes

    # 'Ġ' spells a space: 1 byte (2 in UTF-8); '€' is outside GPT-2's byte alphabet, so its UTF-8 bytes count.
    tokens = ["a", "Ġ" * 14, "€" * 4, "<|a_control_token|>"]
    assert longest(tokens, [1, 1, 1, 3]) == 19  # the control token's text, matched as it is
    assert longest(tokens[:3], [1, 1, 1]) == 14  # 14 spaces, above 12 bytes of '€'
    assert longest(tokens[:3], [1, 6, 1]) == 28  # a token not of type normal: its UTF-8 text counts


def test_sentencepiece_pieces_count_their_utf8_text_and_other_tokenizers_get_no_bound(tmp_path: Path) -> None:
    facts = vocabulary_facts(write_gguf(tmp_path / "s.gguf", vocabulary("llama", ["▁the", "<0x0A>"], [1, 6])))
    assert facts.token_bytes == 6  # '▁the' is 6 UTF-8 bytes, '<0x0A>' 6: never fewer than they stand for
    for tokenizer in ("bert", "t5", "rwkv"):  # may normalise input away: no byte bound holds
        path = write_gguf(tmp_path / f"{tokenizer}.gguf", vocabulary(tokenizer, ["abc"], [1]))
        assert vocabulary_facts(path).token_bytes is None


def test_what_is_not_a_readable_gguf_is_an_error(tmp_path: Path) -> None:
    whole = write_gguf(tmp_path / "m.gguf", vocabulary("gpt2", ["a", "bb"], [1, 1])).read_bytes()
    cases = {"not.gguf": b"GGML" + whole[4:], "cut.gguf": whole[:-3], "v1.gguf": whole[:4] + b"\x01" + whole[5:]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(GGUFError):
            read_metadata(tmp_path / name, lambda key: True)
    bound = PromptBound.of_model(tmp_path / "cut.gguf", 1000)  # logged, and nothing refused
    assert bound.max_chars is None and bound.refusal(10**9) is None


def test_a_slot_holds_its_context_rounded_up_to_256_and_capped_by_training() -> None:
    assert [slot_tokens(n, None) for n in (256, 300, 1024, 4096)] == [256, 512, 1024, 4096]
    assert slot_tokens(4096, 2048) == 2048


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "grok-3", **fields})


def test_the_bound_counts_the_text_the_engine_renders() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get", "arguments": "  {\"a\": 1}\n\n"}}
    r = request(messages=[{"role": "system", "content": "abc"},
                          {"role": "user", "content": [{"type": "text", "text": "de"}, {"type": "text", "text": "f"}]},
                          {"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "c1", "content": "gh"}])
    assert message_chars(r) == 3 + 3 + len("get") + len('{"a": 1}') + 2


def test_before_the_model_is_read_a_conservative_bound_refuses_only_the_absurd(tmp_path: Path) -> None:
    engine = LocalEngine(model_path=None, cache_dir=tmp_path, ctx_per_slot=256)
    limit = 256 * UNREAD_TOKEN_BYTES

    def check(chars: int) -> GatewayError:
        with pytest.raises(GatewayError) as info:
            engine.check(request(messages=[{"role": "user", "content": "y" * chars}]))
        return info.value

    assert check(limit).code == "model_loading"  # may fit once loaded: retry
    refused = check(limit + 1)
    assert (refused.status, refused.code, refused.param) == (400, "bad_request", "messages")
    tools = [{"type": "function", "function": {"name": "f", "description": "z" * 100, "parameters": {}}}]
    with pytest.raises(GatewayError) as info:  # the tools' JSON is part of the prompt
        engine.check(request(messages=[{"role": "user", "content": "y" * (limit - 50)}], tools=tools))
    assert (info.value.status, info.value.param) == (400, "messages")


# -- slots ------------------------------------------------------------------------------------------------------

X1, X2, Y1 = (b"x1",), (b"x1", b"x2"), (b"y1",)


def test_a_slot_is_reused_only_by_the_tenant_whose_tokens_it_holds() -> None:
    table = SlotTable(1)
    slot, own = table.take("A", X1)
    assert not own  # empty: nothing to reuse
    table.give_back(slot, "A", X1, evaluated=True)
    assert table.take("B", X1) == (slot, False)  # the same prompt from another tenant: a fresh evaluation
    table.give_back(slot, "B", X1, evaluated=True)
    assert table.take("A", X2) == (slot, False)  # now B's


def test_a_job_of_another_tenant_that_ended_unseen_leaves_the_slot_nobodys() -> None:
    """Refused or cancelled during its prompt's evaluation, it may have left A's tokens, its own or a mix."""
    table = SlotTable(1)
    slot, _ = table.take("A", X1)
    table.give_back(slot, "A", X1, evaluated=True)
    table.take("B", Y1)
    table.give_back(slot, "B", Y1, evaluated=False)
    assert table.take("A", X2) == (slot, False)
    table.give_back(slot, "A", X2, evaluated=False)  # (not evaluated, and the slot was nobody's)
    assert table.take("B", Y1) == (slot, False)
    table.give_back(slot, "B", Y1, evaluated=True)
    table.take("B", Y1)
    table.give_back(slot, "B", Y1, evaluated=False)  # its own slot stays its own: only its tokens were there
    assert table.take("B", Y1) == (slot, True)


def test_a_job_the_engine_refused_leaves_the_slot_as_it_was() -> None:
    """llama.cpp refuses a request (its length above all) before its prompt reaches the slot's KV cache."""
    table = SlotTable(1)
    slot, _ = table.take("A", X1)
    table.give_back(slot, "A", X1, evaluated=True)
    table.take("B", Y1)
    table.give_back(slot, "B", Y1, evaluated=False, touched=False)
    assert table.take("A", X2) == (slot, True)


def test_a_tenant_goes_to_the_slot_sharing_most_messages_else_the_least_recently_used() -> None:
    table = SlotTable(3)
    for tenant, prompt in (("A", X1), ("A", Y1), ("B", Y1)):
        slot, _ = table.take(tenant, prompt)
        table.give_back(slot, tenant, prompt, evaluated=True)
    slot, own = table.take("A", X2)
    assert (slot.id, own) == (0, True)  # A's X conversation, though slot 1 was used later
    table.give_back(slot, "A", X2, evaluated=True)
    slot, own = table.take("B", (b"z",))  # no message in common with its slot: the least recently used one
    assert (slot.id, own) == (1, False)
    busy, _ = table.take("A", Y1)  # every idle slot taken in turn; the busy one is never handed out
    assert busy.id == 2 and table.take("A", Y1)[0].id == 0


def test_a_job_counts_as_evaluated_once_the_engine_reports_counts() -> None:
    async def run() -> None:
        job = _Job(0, {"messages": []}, asyncio.get_running_loop(), asyncio.Queue(), exclusive=False)
        job.on_chunk({"error": {"code": 400, "message": "request (300 tokens) exceeds the available context"}})
        assert not job.evaluated
        assert job.refused and not job.evaluated  # a 4xx before any count: the slot is as it was
        job.on_chunk({"choices": [{"delta": {"role": "assistant"}}], "timings": {"prompt_n": 3, "cache_n": 0}})
        assert job.evaluated
        later = _Job(0, {"messages": []}, asyncio.get_running_loop(), asyncio.Queue(), exclusive=False)
        later.on_chunk({"error": {"code": 500, "message": "failed to decode"}})
        assert not later.refused  # a 5xx may come during the prompt's evaluation

    asyncio.run(run())


# -- a tenant's long prompts, one at a time -------------------------------------------------------------------------


def test_a_tenants_long_prompts_enter_the_queue_one_at_a_time() -> None:
    released: list[tuple[object, str]] = []
    lane: TenantLane[str] = TenantLane(lambda key, job: released.append((key, job)))
    lane.put("A", 1, ["a1", "a2"])
    lane.put("A", 2, ["a3"])
    lane.put("B", 3, ["b1"])
    assert released == [(1, "a1"), (3, "b1")] and len(lane) == 2
    lane.done("A")
    assert released[-1] == (1, "a2")
    assert lane.discard(2) == ["a3"] and len(lane) == 0  # the client left: taken back, never released
    lane.done("A")
    lane.done("B")
    lane.put("A", 4, ["a4"])  # nothing of A's in flight any more: released at once
    assert released[-1] == (4, "a4")


def test_one_tenants_long_prompts_never_hold_every_worker(tmp_path: Path) -> None:
    """Four prompts of tenant A, each likely too long for a slot, and one short prompt of tenant B on four
    workers: A's are tokenised one at a time, so B's job starts while A's first is still in the engine (before:
    A's four held every worker, and B waited for one of them)."""
    engine = LocalEngine(model_path=None, cache_dir=tmp_path, slots=4, ctx_per_slot=256)
    engine.prompt_bound = PromptBound(slot_tokens=256, token_bytes=128)  # as loaded: 32,768 characters at most
    b_started = threading.Event()
    lock = threading.Lock()
    running = {"A": 0, "most": 0}

    class Engine:
        def handle_chat_completions(self, payload: dict[str, Any], on_chunk: Any) -> None:
            if payload["messages"][0]["content"] == "short":
                b_started.set()
                on_chunk({"choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}],
                          "timings": {"prompt_n": 5, "cache_n": 0, "predicted_n": 1}})
                on_chunk({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}})
                return
            with lock:
                running["A"] += 1
                running["most"] = max(running["most"], running["A"])
            b_started.wait(10)  # tokenising, until B's job has had a worker (or 10 s: the failure)
            with lock:
                running["A"] -= 1
            on_chunk({"error": {"code": 400, "message": "request (1300 tokens) exceeds the available context size"}})

    engine._server = Engine()
    workers = [threading.Thread(target=engine._work, daemon=True) for _ in range(4)]
    for worker in workers:
        worker.start()

    async def run(tenant: str, text: str) -> str:
        call = Call(request(messages=[{"role": "user", "content": text}], temperature=1.0), tenant)
        try:
            async for _ in engine.generate(call, "m"):
                pass
        except GatewayError as exc:
            return f"{exc.status} {b_started.is_set()}"
        return "ok"

    async def scenario() -> list[str]:
        longs = [asyncio.create_task(run("A", "y" * 5000)) for _ in range(4)]
        await asyncio.sleep(0.05)  # A's four are in before B's
        return [await run("B", "short"), *await asyncio.gather(*longs)]

    try:
        results = asyncio.run(scenario())
    finally:
        engine._queue.close()
    assert results == ["ok"] + ["400 True"] * 4
    assert running["most"] == 1 and engine.status()["queued"] == 0
