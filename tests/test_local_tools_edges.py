"""Edges of local tool calls and affinity a review found (each failed before its fix); offline, no model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from grokgate.core.errors import GatewayError
from grokgate.providers.base import Call
from grokgate.providers.local import LocalEngine, LocalGeneration, _Job, _payload
from grokgate.providers.local_tools import TEXT_ONLY_GRAMMAR, check_tools, plan_tools
from grokgate.schemas.chat import ChatCompletionRequest

W = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "grok-3", "messages": [{"role": "user", "content": "Weather in Paris?"}], **fields})


def chunk(text: str, timings: dict[str, int] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"choices": [{"delta": {"content": text}, "finish_reason": None}]}
    if timings is not None:  # llama.cpp's running counts (`timings_per_token`, which grokgate asks for)
        out["timings"] = timings
    return out


@pytest.mark.parametrize("counted", [True, False])
def test_a_repeated_call_stopped_early_still_bills_its_prompt(counted: bool) -> None:
    """The parser ends a repeated call by aborting the job, so llama.cpp sends no usage report: the running
    counts of the last chunk bill it exactly (before: the prompt estimated from its length, 16% over on a real
    tool prompt); a job aborted before any chunk counted has its prompt estimated and marked so."""
    async def run() -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        job = _Job(0, {}, asyncio.get_running_loop(), queue, exclusive=False, plan=plan_tools([W], "required", None))
        job.started = True
        pieces = [(CALL, 20), ("\n", 21), (CALL, 41)]
        timings = [{"cache_n": 100, "prompt_n": 156, "predicted_n": n} if counted else None for _, n in pieces]
        assert any([job.on_chunk(chunk(piece, t)) for (piece, _), t in zip(pieces, timings, strict=True)])
        generation = LocalGeneration(engine=None, jobs=[job], queue=queue, prompt_estimate=300)  # type: ignore[arg-type]
        usage = generation._merged_usage()
        if counted:
            assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (256, 100, 41)
            assert not usage.estimated
        else:
            assert usage.prompt_tokens == 300 and usage.estimated

    asyncio.run(run())


def test_the_engine_is_asked_for_running_counts() -> None:
    assert _payload(Call(request(), "key:k"), "m")["timings_per_token"] is True


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [W], "stop": ["Paris"]}, "stop"),  # a stop inside a call's arguments would leave broken JSON
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "integer"}}}]},
     "tools[0].function.parameters"),  # arguments are an object (before: "37" decoded as "3")
    ({"tool_choice": "required"}, "tool_choice"),  # nothing to call
])
def test_tool_requests_the_engine_cannot_honour_are_400(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as refused:
        check_tools(request(**fields))
    assert refused.value.status == 400 and refused.value.param == param


def test_stop_with_tool_choice_none_is_fine() -> None:
    check_tools(request(tools=[W], tool_choice="none", stop=["Paris"]))


def test_tool_choice_none_still_keeps_calls_out_of_the_text() -> None:
    """With tools and `none`, the answer is held to text that cannot spell a call (before: no grammar at all, and
    the model wrote the call's JSON into content after a round trip)."""
    payload = _payload(Call(request(tools=[W], tool_choice="none"), "key:k"), "grok-3")
    assert payload.get("grammar") == TEXT_ONLY_GRAMMAR


def test_the_grammar_memo_keeps_digests_not_schemas() -> None:
    engine = LocalEngine(model_path=None, cache_dir=Path("/nonexistent"))

    class Server:
        def handle_completions(self, probe: dict[str, Any]) -> dict[str, Any]:
            return {"choices": [{"text": "\u00a7"}]}

    engine._server = Server()
    for i in range(20):
        engine._grammar_ok(f"%llguidance {{}}\nstart: call\n{i}{'x' * 200_000}")
    assert sum(len(k) for k in engine._grammars) <= 20 * 32  # before: 4 MB of grammar text held


def test_a_long_conversation_id_is_hashed_to_openais_limit() -> None:
    from grokgate.providers.openai_compat import BackendConfig, OpenAICompatBackend
    from grokgate.serving.affinity import assign

    for shared in (False, True):
        call = Call(request(), "key:key-0", conversation_id="c" * 100)
        call = call.admitted(None, *assign(call, shared=shared))
        opted = OpenAICompatBackend(BackendConfig(name="openai", base_url="http://127.0.0.1:9/v1",
                                                  prompt_cache_key=True))
        assert len(opted.payload(call, "m", False)["prompt_cache_key"]) <= 64


def test_a_system_message_added_later_keeps_the_conversation_id() -> None:
    from grokgate.serving.affinity import derived_key

    who = "token:1"
    first = request().messages
    later = request(messages=[{"role": "user", "content": "Weather in Paris?"},
                              {"role": "assistant", "content": "Sunny."},
                              {"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "And Rome?"}]).messages
    assert derived_key(first, who) == derived_key(later, who)


def matches(rule: str, text: str) -> bool:
    """A lexeme rule as llguidance reads it (`A & ~B & ~C`: A and neither B nor C), with Python's regexes."""
    import re

    first, *negated = [part.strip() for part in rule.split(":", 1)[1].split("&")]
    assert first.startswith("/") and all(n.startswith("~/") for n in negated)
    if re.fullmatch(first[1:-1], text) is None:
        return False
    return not any(re.fullmatch(n[2:-1], text) for n in negated)


@pytest.mark.parametrize(("text", "auto", "none"), [
    ("It is sunny in Paris today.", True, True),
    ("```python\ndef f(d):\n    return {k: v for k, v in d.items()}\n```", True, False),  # code may open a fence
    ("Use f(x) { return x; } here.", True, True),  # braces in text
    ('Sure: {"name": "get_weather", "arguments": {"city": "Paris"}}', False, False),
    ('```json\n{"city": "Paris"}\n```', False, False),  # cannot start like a fenced call
    ("{ name: 1 }", False, False),
    ('Here:\n```json\n{\n  name: "get_weather",\n  arguments: {city: "Paris"}\n}\n```', True, False),
    ("Done: {'name': 'get_weather'}", False, False),
    ('Here: {\n"name\': "Paris"}', False, False),  # a call-like text that came through under auto
])
def test_what_text_may_hold(text: str, auto: bool, none: bool) -> None:
    """The text branch of `auto` starts unlike a call and never spells a call's object, but may hold braces and
    code (before: no `{` at all, nor a fence at the start); where no call may come (`none` with tools, the answer
    after a repeated call) the model pushes calls into text, so objects with quoted keys and ```json stay out."""
    from grokgate.providers.local_tools import _TEXT_ONLY_RULE, _TEXT_RULE

    assert matches(_TEXT_RULE, text) is auto
    assert matches(_TEXT_ONLY_RULE, text) is none


def test_a_named_function_is_one_call() -> None:
    plan = plan_tools([W], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert plan is not None and plan.forced and not plan.parallel
    assert "calls: call\n" in plan.grammar() and "SEP call" not in plan.grammar()  # one call, not a list


def test_an_answer_after_a_repeated_call_is_generated_again_and_billed_once_each() -> None:
    """After tool results the model repeats the answered call; the job then answers as with tool_choice none
    (no events from the first generation), within the rest of the cap, and bills both generations, which the
    reservation covers (prompt_copies 2)."""
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "a", "content": "sunny"}]
    asked = request(tools=[W], messages=history, max_tokens=50)
    engine = LocalEngine(model_path=None, cache_dir=Path("/nonexistent"))
    assert engine.prompt_copies(asked) == 2
    assert engine.prompt_copies(request(tools=[W], max_tokens=50)) == 1  # a continuation bills its prompt once
    assert engine.prompt_copies(request(tools=[W], messages=history, tool_choice="required",
                                        parallel_tool_calls=False)) == 1
    assert engine.prompt_copies(request()) == 1

    async def run() -> None:
        from grokgate.providers.local import _answered, _Untooled

        queue: asyncio.Queue[Any] = asyncio.Queue()
        call = Call(asked, "key:k", output_cap=50)
        first = _payload(call, "m")
        job = _Job(0, first, asyncio.get_running_loop(), queue, exclusive=False, plan=plan_tools([W], "auto", False),
                   answered=_answered(asked))
        job.fallback = _payload(_Untooled(call), "m")
        assert "# Tools" in first["messages"][0]["content"] and job.fallback["grammar"] == TEXT_ONLY_GRAMMAR
        assert all("# Tools" not in str(m["content"]) for m in job.fallback["messages"])
        repeat = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
        assert job.on_chunk(chunk(repeat, {"cache_n": 0, "prompt_n": 200, "predicted_n": 12})) is True
        again = job.answer_again()
        assert again is not None and again["max_tokens"] == 38 and job.parser is None
        assert job.on_chunk(chunk("It is sunny.", {"cache_n": 0, "prompt_n": 120, "predicted_n": 4})) is False
        job.on_chunk({"choices": [{"delta": {}, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 120, "completion_tokens": 4}})
        usage = job.consumed()
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (320, 16)
        await asyncio.sleep(0)
        events = []
        while not queue.empty():
            events.append(queue.get_nowait())
        assert [getattr(e, "content", None) for e in events if hasattr(e, "content")] == ["It is sunny."]
        assert [e.reason for e in events if hasattr(e, "reason")] == ["stop"]

    asyncio.run(run())


def test_calls_the_model_ended_on_get_a_continuation_in_the_templates_blocks() -> None:
    """The model ends after one call in the bare or fenced shape, but after `<tool_call>` blocks it goes on with
    the other calls a parallel question needs: its calls are written back as blocks and it may add more (or
    nothing); the finish waits for that. It extends the same answer: the prompt is billed once, the outputs add
    up within the cap, so the reservation (one prompt, max_tokens) still bounds it."""
    async def run() -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        asked = request(tools=[W], messages=[{"role": "user", "content": "Weather in Paris and Rome?"}])
        call = Call(asked, "key:k", output_cap=100)
        job = _Job(0, _payload(call, "m"), asyncio.get_running_loop(), queue, exclusive=False,
                   plan=plan_tools([W], "auto", None))
        paris = '```json\n{\n  "name": "get_weather",\n  "arguments": {"city": "Paris"}\n}\n```'
        assert job.on_chunk(chunk(paris, {"cache_n": 0, "prompt_n": 150, "predicted_n": 30})) is False
        done = {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 150,
                                                                             "completion_tokens": 30}}
        assert job.on_chunk(done) is True  # held: no Finish yet
        more = job.answer_again()
        assert more is not None and more["max_tokens"] == 70 and "start: calls?" in more["grammar"]
        assert more["messages"][-1] == {"role": "assistant", "content": (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n')}
        job.on_chunk(chunk('{"name": "get_weather", "arguments": {"city": "Rome"}}'))
        job.on_chunk({"choices": [{"delta": {}, "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 190, "completion_tokens": 15, "prompt_tokens_details": {
                          "cached_tokens": 150}}})
        assert job.answer_again() is None
        job.end()
        usage = job.consumed()
        assert usage is not None and (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == \
            (150, 0, 45)
        await asyncio.sleep(0)
        events = []
        while not queue.empty():
            events.append(queue.get_nowait())
        calls = [c for e in events for c in getattr(e, "tool_calls", None) or ()]
        assert [c["index"] for c in calls] == [0, 1]
        assert [e.reason for e in events if hasattr(e, "reason")] == ["tool_calls"]

    asyncio.run(run())
