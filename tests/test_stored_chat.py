"""xAI's stored chat completions on the Responses store (serving/stored_chat.py): the functions the gRPC `Chat`
service calls, driven on a real in-process app (accounts on, its SQL store, on the server's own event loop), and
the same conversations read and continued over HTTP through `/v1/responses` with the openai SDK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Coroutine, Iterator
from typing import Any, TypeVar

import openai
import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from grokgate.app import create_app
from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Finish, Usage, UsageReport
from grokgate.schemas.chat import ChatCompletionRequest, Message
from grokgate.serving.responses import ResponsesService, chat_messages
from grokgate.serving.stored_chat import Keeper, delete, history, input_items, stored_completion
from tests.conftest import create_key
from tests.inproc import AppServer, ScriptedProvider, app_settings, scripted_models, serve_app

T = TypeVar("T")
MAX_MESSAGES = 16
MAX_STORED = 8192
CITY: dict[str, Any] = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER: dict[str, Any] = {"type": "function", "function": {"name": "get_weather",
                                                            "description": "The weather in a city.",
                                                            "parameters": CITY}}


class Plays:
    """What the scripted backend answers: the queued event lists in turn, then a plain answer."""

    def __init__(self) -> None:
        self.queue: list[list[Event]] = []

    async def script(self, request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
        events: list[Event] = self.queue.pop(0) if self.queue else [Delta(index=0, content="Plain answer."),
                                                       Finish(index=0, reason="stop"),
                                                       UsageReport(Usage(prompt_tokens=7, completion_tokens=2))]
        for event in events:
            yield event


class Gate:
    """The served app, its two tokens' owners and SDK clients, and a way to run coroutines on its loop."""

    def __init__(self, served: AppServer, provider: ScriptedProvider, plays: Plays,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.served = served
        self.provider = provider
        self.plays = plays
        self.loop = loop
        self.responses: ResponsesService = served.app.state.gateway.responses
        token_a, key_a = create_key(served, "alice", credits="100")
        token_b, key_b = create_key(served, "bob", credits="100")
        self.owner_a, self.owner_b = f"account:{key_a['account_id']}", f"account:{key_b['account_id']}"
        self.a = openai.OpenAI(base_url=f"{served.url}/v1", api_key=token_a, max_retries=0)
        self.b = openai.OpenAI(base_url=f"{served.url}/v1", api_key=token_b, max_retries=0)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """On the server's loop, as the gRPC service runs them (the SQL store belongs to that loop)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def keep(self, messages: list[dict[str, Any]], answer: dict[str, Any], *, previous_id: str | None = None,
             owner: str | None = None, **settings: Any) -> tuple[str, bool]:
        """A stored chat turn as the gRPC service keeps one: its id, and whether it was kept."""
        request = ChatCompletionRequest.model_validate({"model": "grok-3", "messages": messages, **settings})
        keeper = Keeper(self.responses, owner or self.owner_a, request.messages, previous_id=previous_id,
                        request=request)
        choices = answer.get("choices") or [{"index": 0, "message": {"role": "assistant", **answer["message"]},
                                             "finish_reason": answer.get("finish_reason", "stop")}]
        completion = {"id": keeper.id, "object": "chat.completion", "created": 1_700_000_000, "model": "grok-3",
                      "choices": choices, "usage": answer.get("usage", {"prompt_tokens": 11,
                                                                        "completion_tokens": 5})}
        return keeper.id, self.run(keeper.keep(completion))

    def history(self, previous_id: str, turn: int = 1, owner: str | None = None) -> list[dict[str, Any]]:
        return self.run(history(self.responses, owner or self.owner_a, previous_id, turn))

    def sent(self) -> list[dict[str, Any]]:
        """The messages of the backend's last request, as it received them."""
        return [m.model_dump(exclude_none=True) for m in self.provider.requests[-1][0].messages]


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gate]:
    plays = Plays()
    provider = ScriptedProvider(script=plays.script)
    app = create_app(app_settings(tmp_path_factory.mktemp("stored_chat"), max_messages=MAX_MESSAGES,
                                  max_stored_response_bytes=MAX_STORED), models=scripted_models(provider))
    loops: list[asyncio.AbstractEventLoop] = []

    async def capture(request: Request) -> PlainTextResponse:
        loops.append(asyncio.get_running_loop())
        return PlainTextResponse("ok")

    app.router.routes.insert(0, Route("/test-loop", capture))
    with serve_app(app) as served, served.client() as c:
        assert c.get("/test-loop").status_code == 200
        yield Gate(served, provider, plays, loops[0])


def as_sent(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the backend's request holds them (`Gate.sent`)."""
    return [Message.model_validate(m).model_dump(exclude_none=True) for m in messages]


def not_found(gate: Gate, coro: Coroutine[Any, Any, Any], param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        gate.run(coro)
    assert (caught.value.status, caught.value.code, caught.value.param) == (404, "not_found", param)


def test_a_stored_chat_turn_is_a_response_read_and_continued_over_http(gate: Gate) -> None:
    turn = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    first, kept = gate.keep(turn, {"message": {"content": "Hello!", "reasoning_content": "They greet me."},
                                   "usage": {"prompt_tokens": 11, "completion_tokens": 5,
                                             "completion_tokens_details": {"reasoning_tokens": 2}}},
                            max_tokens=50, temperature=0.5, tools=[WEATHER])
    assert kept and first.startswith("resp_")

    response = gate.a.responses.retrieve(first)  # the SDK's own types parse it
    assert (response.status, response.model, response.output_text) == ("completed", "grok-3", "Hello!")
    assert response.max_output_tokens == 50 and response.temperature == 0.5
    assert [t.name for t in response.tools] == ["get_weather"]  # type: ignore[union-attr]
    assert [o.type for o in response.output] == ["reasoning", "message"]
    assert response.output[0].summary[0].text == "They greet me."  # type: ignore[union-attr]
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (11, 5, 16)
    assert response.usage.output_tokens_details.reasoning_tokens == 2
    items = gate.a.responses.input_items.list(first, order="asc").data
    assert [(i.role, i.content[0].text) for i in items] == [  # type: ignore[union-attr,index]
        ("system", "Be brief."), ("user", "Hi")]

    # Continued over /v1/responses: the backend gets the chat turn, its answer, then the new input.
    second = gate.a.responses.create(model="grok-3", input="And again?", previous_response_id=first)
    assert gate.sent() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And again?"}]

    # ... and back: a chat request continuing the /v1/responses response gets the whole conversation.
    assert gate.history(second.id, 1) == [*gate.sent(), {"role": "assistant", "content": "Plain answer."}]
    assert gate.run(stored_completion(gate.responses, gate.owner_a, second.id))["choices"][0]["message"] == {
        "role": "assistant", "content": "Plain answer."}
    third, _ = gate.keep([{"role": "user", "content": "Thanks"}], {"message": {"content": "Welcome."}},
                         previous_id=second.id)
    assert gate.a.responses.retrieve(third).previous_response_id == second.id
    assert [m["content"] for m in gate.history(third)] == ["Be brief.", "Hi", "Hello!", "And again?",
                                                          "Plain answer.", "Thanks", "Welcome."]


def test_the_stored_completion_is_the_chat_answer_kept(gate: Gate) -> None:
    answer_id, _ = gate.keep([{"role": "user", "content": "Hi"}],
                             {"message": {"content": "Hello!", "reasoning_content": "Hm."},
                              "usage": {"prompt_tokens": 11, "completion_tokens": 5,
                                        "prompt_tokens_details": {"cached_tokens": 3},
                                        "completion_tokens_details": {"reasoning_tokens": 2}}})
    assert gate.run(stored_completion(gate.responses, gate.owner_a, answer_id)) == {
        "id": answer_id, "object": "chat.completion", "created": 1_700_000_000, "model": "grok-3",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!", "reasoning_content": "Hm."},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16,
                  "prompt_tokens_details": {"cached_tokens": 3}, "completion_tokens_details": {"reasoning_tokens": 2}}}


def test_a_cut_answer_is_stored_incomplete_and_read_back_as_length(gate: Gate) -> None:
    answer_id, _ = gate.keep([{"role": "user", "content": "Count"}],
                             {"message": {"content": "1 2 3"}, "finish_reason": "length"})
    response = gate.a.responses.retrieve(answer_id)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    completion = gate.run(stored_completion(gate.responses, gate.owner_a, answer_id))
    assert completion["choices"][0]["finish_reason"] == "length"


def test_tool_calls_and_results_survive_both_ways(gate: Gate) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    asked, _ = gate.keep([{"role": "user", "content": "Weather in Paris?"}],
                         {"message": {"content": None, "tool_calls": [call]}, "finish_reason": "tool_calls"},
                         tools=[WEATHER])
    completion = gate.run(stored_completion(gate.responses, gate.owner_a, asked))
    assert completion["choices"][0]["message"] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert completion["choices"][0]["finish_reason"] == "tool_calls"
    output = gate.a.responses.retrieve(asked).output
    assert [(o.type, o.call_id, o.name, o.arguments) for o in output] == [  # type: ignore[union-attr]
        ("function_call", "call_1", "get_weather", '{"city":"Paris"}')]

    answered, _ = gate.keep([{"role": "tool", "tool_call_id": "call_1", "content": "18C"}],
                            {"message": {"content": "It is 18C."}}, previous_id=asked)
    items = gate.a.responses.input_items.list(answered).data
    assert [(i.type, i.call_id, i.output) for i in items] == [  # type: ignore[union-attr]
        ("function_call_output", "call_1", "18C")]
    conversation: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "assistant", "content": "It is 18C."}]
    assert gate.history(answered) == conversation
    gate.a.responses.create(model="grok-3", input="And Rome?", previous_response_id=answered)
    assert gate.sent() == as_sent([*conversation, {"role": "user", "content": "And Rome?"}])


def test_a_responses_function_call_continues_as_chat(gate: Gate) -> None:
    gate.plays.queue.append([
        Delta(index=0, tool_calls=[{"index": 0, "id": "call_9", "type": "function",
                                    "function": {"name": "get_weather", "arguments": '{"city":'}}]),
        Delta(index=0, tool_calls=[{"index": 0, "function": {"arguments": '"Oslo"}'}}]),
        Finish(index=0, reason="tool_calls"), UsageReport(Usage(prompt_tokens=9, completion_tokens=4))])
    made = gate.a.responses.create(model="grok-3", input="Weather in Oslo?", tools=[
        {"type": "function", "name": "get_weather", "parameters": CITY, "strict": False}])
    call = {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    assert gate.history(made.id) == [{"role": "user", "content": "Weather in Oslo?"},
                                     {"role": "assistant", "content": None, "tool_calls": [call]}]
    completion = gate.run(stored_completion(gate.responses, gate.owner_a, made.id))
    assert completion["choices"][0]["message"]["tool_calls"] == [call]
    assert completion["choices"][0]["finish_reason"] == "tool_calls"
    assert completion["usage"]["prompt_tokens"] == 9


def test_chat_messages_convert_to_items_and_back_unchanged() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Rules."},
        {"role": "developer", "content": "More rules."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]},
        {"role": "assistant", "content": "Checking two things.", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": '{"x":1}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "one"},
        {"role": "tool", "tool_call_id": "b", "content": "two"},
        {"role": "assistant", "content": "", "refusal": "No."},
        {"role": "user", "content": "ok"},
    ]
    items = input_items(messages)
    assert len({i["id"] for i in items}) == len(items) == 10
    assert [i["type"] for i in items] == ["message"] * 4 + ["function_call"] * 2 + ["function_call_output"] * 2 + [
        "message"] * 2
    assert chat_messages(None, items) == messages


def test_n_choices_are_all_kept_and_choice_0_continues(gate: Gate) -> None:
    choices = [{"index": i, "message": {"role": "assistant", "content": f"Answer {i}"}, "finish_reason": "stop"}
               for i in range(3)]
    batch, kept = gate.keep([{"role": "user", "content": "Three ways"}], {"choices": choices}, n=3)
    assert kept
    completion = gate.run(stored_completion(gate.responses, gate.owner_a, batch))
    assert [c["message"]["content"] for c in completion["choices"]] == ["Answer 0", "Answer 1", "Answer 2"]
    assert [c["index"] for c in completion["choices"]] == [0, 1, 2]
    assert gate.a.responses.retrieve(batch).output_text == "Answer 0"
    assert gate.history(batch)[-1] == {"role": "assistant", "content": "Answer 0"}


def test_another_owner_finds_nothing(gate: Gate) -> None:
    mine, _ = gate.keep([{"role": "user", "content": "secret"}], {"message": {"content": "kept"}})
    b = gate.owner_b
    not_found(gate, stored_completion(gate.responses, b, mine), "response_id")
    not_found(gate, delete(gate.responses, b, mine), "response_id")
    not_found(gate, history(gate.responses, b, mine, 1), "previous_response_id")
    with pytest.raises(openai.NotFoundError):
        gate.b.responses.retrieve(mine)
    with pytest.raises(openai.NotFoundError):
        gate.b.responses.create(model="grok-3", input="hi", previous_response_id=mine)
    # Bob's own answers continue for Bob and are hidden from Alice.
    his, _ = gate.keep([{"role": "user", "content": "mine"}], {"message": {"content": "his"}}, owner=b)
    assert gate.history(his, owner=b)[-1] == {"role": "assistant", "content": "his"}
    not_found(gate, stored_completion(gate.responses, gate.owner_a, his), "response_id")
    # Alice's is still there after Bob's attempts.
    assert gate.run(stored_completion(gate.responses, gate.owner_a, mine))["choices"][0]["message"]["content"] == \
        "kept"


def test_delete_then_nothing_is_found(gate: Gate) -> None:
    gone, _ = gate.keep([{"role": "user", "content": "forget me"}], {"message": {"content": "ok"}})
    assert gate.run(delete(gate.responses, gate.owner_a, gone)) == gone
    not_found(gate, stored_completion(gate.responses, gate.owner_a, gone), "response_id")
    not_found(gate, delete(gate.responses, gate.owner_a, gone), "response_id")
    not_found(gate, history(gate.responses, gate.owner_a, gone, 1), "previous_response_id")
    with pytest.raises(openai.NotFoundError):
        gate.a.responses.retrieve(gone)
    made = gate.a.responses.create(model="grok-3", input="hi")
    assert gate.run(delete(gate.responses, gate.owner_a, made.id)) == made.id  # one made by /v1/responses too
    with pytest.raises(openai.NotFoundError):
        gate.a.responses.retrieve(made.id)


def test_an_answer_over_the_size_bound_is_answered_but_not_kept(gate: Gate) -> None:
    big, kept = gate.keep([{"role": "user", "content": "Say a lot"}], {"message": {"content": "x" * MAX_STORED}})
    assert not kept
    not_found(gate, stored_completion(gate.responses, gate.owner_a, big), "response_id")
    _, kept = gate.keep([{"role": "user", "content": "Say a little"}], {"message": {"content": "x"}})
    assert kept


def test_a_chain_past_the_bound_is_refused(gate: Gate) -> None:
    previous: str | None = None
    for k in range(5):  # 3 items a turn: 15 in all
        previous, _ = gate.keep([{"role": "system", "content": "s"}, {"role": "user", "content": f"turn {k}"}],
                                {"message": {"content": "ok"}}, previous_id=previous)
    assert previous is not None
    assert len(gate.history(previous, 1)) == 15  # 15 + this turn's 1 = MAX_MESSAGES
    with pytest.raises(GatewayError) as caught:
        gate.history(previous, 2)
    assert (caught.value.status, caught.value.param) == (400, "previous_response_id")
    assert str(MAX_MESSAGES) in caught.value.message
