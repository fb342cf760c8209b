"""Function calling on the embedded engine (providers/local_tools.py): the prompt, the grammar and the parser
offline, then the real server and model through the openai SDK (e2e: each generation costs seconds)."""

from __future__ import annotations

import json
from typing import Any

import openai
import pydantic
import pytest

from grokgate.core.errors import GatewayError
from grokgate.providers.local_tool_parser import ToolCallParser
from grokgate.providers.local_tools import answered_calls, parser_for, plan_tools, render_messages
from tests.conftest import Server, wait_idle

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a dev dependency)")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
FORECAST_PARAMS = {
    "type": "object",
    "properties": {
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "fields": {"type": "array", "items": {"type": "string", "enum": ["temp", "rain", "wind"]},
                   "minItems": 1, "maxItems": 3},
    },
    "required": ["unit", "days", "fields"],
    "additionalProperties": False,
}
FORECAST = {"type": "function", "function": {"name": "forecast", "description": "A weather forecast for Paris.",
                                             "parameters": FORECAST_PARAMS}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# -- offline: prompt, grammar, parser ----------------------------------------------------------------------

def parser(tools: list[dict[str, Any]], choice: Any = "auto", parallel: bool | None = None,
           answer: dict[str, Any] | None = None, answered: frozenset[str] = frozenset(),
           asked: str = 'Weather in Pa"}ris and Rome?') -> ToolCallParser:
    plan = plan_tools(tools, choice, parallel, answer)
    assert plan is not None
    return parser_for(plan, answered, [{"role": "user", "content": asked}])


def feed_all(parser: ToolCallParser, pieces: list[str], reason: str = "stop") -> tuple[str, list[Any], str]:
    content, calls = "", []
    for piece in pieces:
        text, found = parser.feed(piece)
        content += text
        calls += found
    content += parser.flush()  # as providers/local_jobs.py does at the finish
    return content, calls, parser.finish(reason)


def by3(text: str) -> list[str]:
    return [text[i:i + 3] for i in range(0, len(text), 3)]


def test_plan_modes() -> None:
    assert plan_tools([WEATHER], "none", None) is None
    assert plan_tools(None, "auto", None) is None
    auto = plan_tools([WEATHER, FORECAST], None, None)
    assert auto is not None and not auto.forced and auto.parallel and auto.names == ["get_weather", "forecast"]
    named = plan_tools([WEATHER, FORECAST], {"type": "function", "function": {"name": "forecast"}}, False)
    assert named is not None and named.forced and named.names == ["forecast"] and not named.parallel
    grammar = named.grammar()
    assert grammar.startswith("%llguidance")
    assert "start: calls\n" in grammar and "calls: call\n" in grammar and "get_weather" not in grammar
    assert "TEXT" not in grammar and '"minimum": 1' in grammar
    assert "start: calls | TEXT" in auto.grammar() and "(SEP call){0,7}" in auto.grammar()
    answer = {"type": "object", "properties": {"city": {"type": "string"}}}
    structured = plan_tools([WEATHER], "auto", None, answer)
    assert structured is not None and "start: calls | answer" in structured.grammar()
    assert 'answer: %json {"type": "object", "properties": {"city"' in structured.grammar()


def test_render_messages_in_the_templates_words() -> None:
    plan = plan_tools([WEATHER], "auto", None)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "18C"},
        {"role": "tool", "tool_call_id": "b", "content": "25C"},
    ]
    out = render_messages(messages, plan)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools\n") and '"name": "get_weather"' in out[0]["content"]
    assert out[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                                 '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    assert out[3]["content"] == "<tool_response>\n18C\n</tool_response>\n<tool_response>\n25C\n</tool_response>"
    assert render_messages(ASK, plan)[0]["content"].startswith("You are Qwen")
    assert render_messages(ASK, None) == ASK


@pytest.mark.parametrize("shape", ["tagged", "bare", "fenced"])
def test_each_call_shape_the_model_writes_is_a_whole_call(shape: str) -> None:
    """The shapes the 0.5B model was measured to write (its template's block, bare JSON, a ```json fence, pretty
    printed or not), several in one answer, each handed on whole: one delta with the name and all the arguments,
    as xAI streams them (before: only the `<tool_call>` block, streamed in OpenAI's fragments)."""
    first = '{"name": "get_weather", "arguments": {"city": "Pa\\"}ris"}}'
    second = '{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Rome"\n  }\n}'
    wrap = {"tagged": lambda c: f"<tool_call>\n{c}\n</tool_call>", "bare": lambda c: c,
            "fenced": lambda c: f"```json\n{c}\n```"}[shape]
    content, calls, reason = feed_all(parser([WEATHER]), by3(wrap(first) + "\n" + wrap(second)))
    assert content == "" and reason == "tool_calls"
    assert [c["index"] for c in calls] == [0, 1]
    assert all(set(c) == {"index", "id", "type", "function"} and c["type"] == "function" for c in calls)
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": 'Pa"}ris'}, {"city": "Rome"}]


def test_parser_stops_at_a_repeated_call() -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    other = call.replace("Paris", "Rome")
    p = parser([WEATHER], "required")
    content, calls, _ = feed_all(p, [call, "\n", other, "\n", call.replace(": ", ":")], "length")
    assert p.done and not p.retry  # the engine is told to stop; the repeat is not passed on
    assert content == "" and [c["index"] for c in calls] == [0, 1]
    assert p.finish("length") == "tool_calls"


def test_a_call_cut_by_the_cap_after_whole_ones_is_dropped() -> None:
    """Only a single call or text reaching the cap ends `length` (before: a second, cut call made the answer
    `length`, which the openai SDK's helpers refuse)."""
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    _, calls, reason = feed_all(parser([WEATHER]), [call, '\n{"name": "get_weather", "argu'], "length")
    assert reason == "tool_calls" and len(calls) == 1
    _, calls, reason = feed_all(parser([WEATHER]), ['<tool_call>\n{"name": "get_weather", "arguments": {"ci'],
                                "length")
    assert reason == "length" and calls == []


def test_calls_the_question_does_not_ask_for_end_the_answer() -> None:
    """At the default temperature the model went on from Paris to London, Tokyo, Berlin... (distinct calls, so no
    repeat stopped them): a later call whose text arguments are in neither the conversation nor an earlier call
    ends the answer."""
    call = '{"name": "get_weather", "arguments": {"city": "%s"}}'
    p = parser([WEATHER], asked="Weather in Paris?")
    _, calls, reason = feed_all(p, [call % "Paris", "\n", call % "London", "\n", call % "Tokyo"])
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris"] and p.done
    assert reason == "tool_calls"
    p = parser([WEATHER], asked="Weather in PARIS and rome?")  # asked for: both stand, whatever their case
    assert len(feed_all(p, [call % "Paris", "\n", call % "Rome"])[1]) == 2


def test_output_no_rule_allows_after_calls_ends_the_answer_not_the_calls() -> None:
    """Calls handed on stand: what follows them that is no call (an engine that ignored a continuation's grammar)
    ends the answer instead of failing it; with no call yet it is the grammar error it always was."""
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    p = parser([WEATHER])
    _, calls, _ = feed_all(p, [call])
    p.resume()
    content, more, reason = feed_all(p, ['{"weather": "sunny"}'])
    assert (content, more, reason, p.done) == ("", [], "tool_calls", True) and len(calls) == 1
    with pytest.raises(GatewayError):
        feed_all(parser([WEATHER], "required"), ['{"weather": "sunny"}'])


@pytest.mark.parametrize("gap", ["\n", "\n\n"])
def test_a_call_announced_on_a_first_line_is_a_call(gap: str) -> None:
    """At the default temperature the model sometimes announces its call ("Here is a JSON object with the function
    name ...:") before writing it: the line is content, the call a call (before: all of it text, no call)."""
    intro = 'Here is a JSON object with the function name "get_weather": '
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    for wrap in (call, f"```json\n{call}\n```", f"<tool_call>\n{call}\n</tool_call>"):
        content, calls, reason = feed_all(parser([WEATHER]), by3(intro + ":" + gap + wrap))
        assert (content, reason) == (intro + ":\n", "tool_calls") and len(calls) == 1, (content, calls)
    for text in ('Here is the JSON:\n{"a": 1}', "Note:\nIt is sunny.", "Sure:", "Sure:\n", "A: b\nc:\n{ x }",
                 "Example:\n```python\nprint(1)\n```", "Here:\n{\"cut"):
        assert feed_all(parser([WEATHER]), by3(text)) == (text, [], "stop"), text


def test_text_answers_pass_through_with_braces_and_code() -> None:
    assert feed_all(parser([WEATHER]), ["Hel", "lo <b>"]) == ("Hello <b>", [], "stop")
    code = "```python\ndef f(d):\n    return {k: v for k, v in d.items()}\n```"
    assert feed_all(parser([WEATHER]), by3(code)) == (code, [], "stop")
    with pytest.raises(GatewayError) as info:  # a forced call that never came: the grammar was not applied
        feed_all(parser([WEATHER], "required"), ["It is sunny."])
    assert info.value.status == 400 and info.value.param == "tools"


def test_a_structured_answer_or_calls() -> None:
    answer = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    text = '{"age": 3, "name": "Rex"}'
    content, calls, reason = feed_all(parser([WEATHER], answer=answer), by3(text))
    assert (content, calls, reason) == (text, [], "stop")
    assert parser([WEATHER], answer=answer).feed('{"age": 3, "na')[0] == '{"age": 3, "na'  # streamed
    named = '{"name": "Rex", "age": 3}'  # starts like a call: held until whole, then the answer
    assert feed_all(parser([WEATHER], answer=answer), by3(named)) == (named, [], "stop")
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    _, calls, reason = feed_all(parser([WEATHER], answer=answer), by3(call))
    assert reason == "tool_calls" and calls[0]["function"]["name"] == "get_weather"


def test_repeating_an_answered_call_asks_for_an_answer() -> None:
    """After a tool result the 0.5B model writes the same call again (p 0.98); that is a wish to answer."""
    answered = answered_calls([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city":  "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"}])
    assert answered == {'get_weather\0{"city":"Paris"}'}
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    p = parser([WEATHER], answered=answered)
    assert feed_all(p, [call]) [:2] == ("", []) and p.retry and p.done
    p = parser([WEATHER], answered=answered)  # a new call first: it stands, the repeat ends the answer
    _, calls, reason = feed_all(p, [call.replace("Paris", "Rome"), "\n", call])
    assert not p.retry and len(calls) == 1 and reason == "tool_calls"
    assert answered_calls([{"role": "user", "content": "again?"}]) == frozenset()


# -- e2e: the real server and model --------------------------------------------------------------------------

# Greedy, unless a test explores sampling: at the default temperature the 0.5B model sometimes writes distinct
# parallel calls until max_tokens (finish_reason "length", which the SDK's helpers refuse to parse). Greedy by
# top_p 0 (only the likeliest token is left to draw: temperature 0's text) rather than temperature 0, which the
# engine treats as a reproducible request and evaluates afresh (providers/local.py: `cache_prompt`): this way the
# tools listing these prompts share (most of their ~180 tokens, ~1.5 s of CPU each) comes from the prompt cache.
# The exclusive, uncached path with tools is the seeded high-temperature test's.
GREEDY: dict[str, Any] = {"temperature": 1, "top_p": 0}


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    wait_idle(server)  # the session's shared server: no other test's job left to share a batch with these
    return openai.OpenAI(base_url=f"{server.url}/grok", api_key=server.token, max_retries=0, timeout=300)


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", ASK)
    kwargs.setdefault("max_tokens", 120)
    if "temperature" not in kwargs:  # greedy unless a test explores sampling
        kwargs.update(GREEDY)
    return client.chat.completions.create(model="grok-3", **kwargs)


def assert_calls(choice: Any, name: str, schema: dict[str, Any]) -> list[dict[str, Any]]:
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and choice.message.tool_calls
    out = []
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == name
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, schema)
        out.append(arguments)
    return out


@pytest.mark.e2e
def test_tool_choice_modes(client: openai.OpenAI) -> None:
    # `required`: test_round_trip_with_tool_result's first turn.
    params = WEATHER["function"]["parameters"]
    auto = chat(client, tools=[WEATHER], tool_choice="auto")
    assert_calls(auto.choices[0], "get_weather", params)
    named = chat(client, tools=[WEATHER, FORECAST], tool_choice={"type": "function", "function": {"name": "forecast"}})
    assert_calls(named.choices[0], "forecast", FORECAST_PARAMS)
    none = chat(client, tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    assert none.choices[0].finish_reason in ("stop", "length")
    # auto on a question the tool does not fit: the 0.5B model may still call it, but whatever it answers is
    # either text with no call's JSON in it or well-formed calls (the text answer after a tool result: below).
    text = chat(client, tools=[WEATHER], messages=[{"role": "user", "content": "Say hello."}], max_tokens=60)
    message = text.choices[0].message
    assert message.tool_calls or '{"' not in (message.content or ""), text
    assert not message.tool_calls or message.content is None
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.body["param"] == "tool_choice"  # type: ignore[index]
    for broken in ({"type": "nonsense"}, {"$ref": "#/nowhere"}):  # schemas the engine cannot enforce: refused
        tool = {"type": "function", "function": {"name": "f", "parameters": broken}}
        with pytest.raises(openai.BadRequestError) as info:
            chat(client, tools=[tool], max_tokens=8)
        # A type other than object is refused up front, naming the schema; an unresolvable one by the engine.
        assert info.value.body["param"] in ("tools", "tools[0].function.parameters")  # type: ignore[index]


@pytest.mark.e2e
def test_schema_valid_at_high_temperature(client: openai.OpenAI) -> None:
    # Seeded, so each sample is reproducible; a seeded job has its prompt evaluated afresh (no prompt cache), so
    # each sample costs a whole prompt: three of them (n > 1 would cost the same: a choice is a job, seed + index).
    calls = []
    for seed in range(3):
        completion = chat(client, tools=[FORECAST], tool_choice="required", temperature=1.6, seed=seed,
                          max_tokens=200, parallel_tool_calls=False)
        calls += assert_calls(completion.choices[0], "forecast", FORECAST_PARAMS)
    assert len(calls) == 3


@pytest.mark.e2e
def test_parallel_false_and_n2(client: openai.OpenAI) -> None:
    completion = chat(client, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, n=2,
                      messages=[{"role": "user", "content": "Weather in Paris, Rome and Oslo?"}])
    assert len(completion.choices) == 2
    ids = set()
    for choice in completion.choices:
        assert len(assert_calls(choice, "get_weather", WEATHER["function"]["parameters"])) == 1
        ids |= {c.id for c in choice.message.tool_calls}
    assert len(ids) == 2


@pytest.mark.e2e
def test_stream_helper_assembles_calls(client: openai.OpenAI) -> None:
    done = []
    with client.chat.completions.stream(model="grok-3", messages=ASK, tools=[WEATHER], tool_choice="required",
                                        max_tokens=120, **GREEDY) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.done":
                done.append((event.name, event.parsed_arguments or json.loads(event.arguments)))
            assert event.type != "content.delta" or not event.delta  # no call's text in content
        final = stream.get_final_completion()
    assert done and done[0][0] == "get_weather" and "city" in done[0][1]
    final.choices[0].message.content = final.choices[0].message.content or None  # the role chunk's ""
    assert_calls(final.choices[0], "get_weather", WEATHER["function"]["parameters"])
    assert not final.choices[0].message.tool_calls[0].function.arguments.startswith(" ")


@pytest.mark.e2e
def test_round_trip_with_tool_result(client: openai.OpenAI) -> None:
    first = chat(client, tools=[WEATHER], tool_choice="required")  # tool_choice "required", checked
    assert_calls(first.choices[0], "get_weather", WEATHER["function"]["parameters"])
    call = first.choices[0].message.tool_calls[0]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'}]
    second = chat(client, tools=[WEATHER], messages=messages, max_tokens=60)
    answer = second.choices[0]
    # The 0.5B model's answer is often poor (it would rather echo the JSON, which `auto` rules out), but it is text.
    assert answer.finish_reason == "stop" and answer.message.tool_calls is None and answer.message.content, answer
    assert '{"' not in answer.message.content


class GetWeather(pydantic.BaseModel):
    city: str
    unit: str = pydantic.Field(json_schema_extra={"enum": ["c", "f"]})


@pytest.mark.e2e
def test_parse_with_pydantic_tool(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(model="grok-3", messages=ASK, max_tokens=120, tool_choice="required",
                                               tools=[openai.pydantic_function_tool(GetWeather)], **GREEDY)
    call = completion.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert call.function.parsed_arguments.unit in ("c", "f")


@pytest.mark.e2e
def test_responses_api_function_call(client: openai.OpenAI) -> None:
    tool = {"type": "function", "name": "get_weather", "description": "Get the current weather of a city.",
            "parameters": WEATHER["function"]["parameters"], "strict": True}
    first = client.responses.create(model="grok-3", input="What is the weather in Paris?", tools=[tool],
                                    tool_choice="required", max_output_tokens=120, **GREEDY)
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments)
    second = client.responses.create(model="grok-3", previous_response_id=first.id, tools=[tool],
                                     max_output_tokens=60, **GREEDY,
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": '{"temperature_c": 18}'}])
    assert second.output_text and not [item for item in second.output if item.type == "function_call"]
