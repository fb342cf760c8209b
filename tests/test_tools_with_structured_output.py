"""Tools with structured output on the embedded model: one request may offer function tools and ask for a JSON
answer (chat `response_format`, Responses `text.format`); the model either calls or answers valid JSON. Shown with
the OpenAI Agents SDK's default agent shape (function tools + `output_type`, tool_choice auto) and with
/v1/responses directly. The 10-run measurement of the agent is bench/agents_offline.py's.
e2e: every generation costs seconds of CPU."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest

from tests.agent_runs import run_weather_agent
from tests.conftest import Server, call, err, ok, wait_idle

pytestmark = pytest.mark.e2e

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (a dev dependency)")

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "Get the current weather of a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"], "additionalProperties": False}}
ANSWER = {"type": "object", "properties": {"city": {"type": "string"}, "summary": {"type": "string"}},
          "required": ["city", "summary"], "additionalProperties": False}


class Weather(pydantic.BaseModel):
    city: str
    temperature_c: int
    summary: str


def test_an_agent_with_a_tool_and_output_type_completes(server: Server) -> None:
    agents = pytest.importorskip("agents", reason="the OpenAI Agents SDK (openai-agents, a dev dependency)")
    # The SDK's defaults (tool_choice auto, no temperature); one seed of bench/agents_offline.py's ten (the SDK has
    # no seed setting: extra_args reach the request body).
    result, calls = run_weather_agent(server, name="forecaster", instructions="Use the tool to answer.",
                                      output_type=Weather, model_settings=agents.ModelSettings(extra_args={"seed": 0}))
    assert len(calls) == 1 and "paris" in calls[0].lower(), calls  # the tool ran, on the model's arguments
    assert isinstance(result.final_output, Weather), result.final_output  # a final answer of the output type
    assert "paris" in result.final_output.city.lower(), result.final_output
    assert len(result.raw_responses) == 2  # one turn to call, one to answer with the result


def test_responses_accept_tools_with_text_format(server: Server) -> None:
    wait_idle(server)
    body = {"model": "grok-3", "input": "What is the weather in Paris?", "tools": [WEATHER_TOOL],
            "text": {"format": {"type": "json_schema", "name": "weather", "schema": ANSWER, "strict": True}},
            "max_output_tokens": 120}
    response = ok(call(server, "POST", "/v1/responses", server.token, json=body))
    assert response["status"] == "completed", response
    calls = [item for item in response["output"] if item["type"] == "function_call"]
    messages = [item for item in response["output"] if item["type"] == "message"]
    if calls:  # either calls, each valid against its function's schema ...
        assert not messages, response
        for item in calls:
            assert item["name"] == "get_weather"
            jsonschema.validate(json.loads(item["arguments"]), WEATHER_TOOL["parameters"])
    else:  # ... or a JSON answer valid against text.format's schema
        [message] = messages
        jsonschema.validate(json.loads(message["content"][0]["text"]), ANSWER)


# A schema the engine cannot compile: the error must name the field the request sent (text.format, not the chat
# API's `response_format`) and the schema at fault (not the tools', which are fine).
@pytest.mark.parametrize("with_tools", [True, False])
def test_an_unusable_text_format_schema_is_named(server: Server, with_tools: bool) -> None:
    body: dict[str, Any] = {"model": "grok-3", "input": "What is the weather in Paris?", "max_output_tokens": 8,
                            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "nonsense"}}}}
    if with_tools:
        body["tools"] = [WEATHER_TOOL]
    error = err(call(server, "POST", "/v1/responses", server.token, json=body), 400, "bad_request")
    assert (error["param"] or "").startswith("text.format"), error
    assert "response_format" not in error["message"] and "tools" not in error["message"], error
