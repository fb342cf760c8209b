"""The OpenAI Agents SDK, with its default model class (the Responses API), pointed at grokgate: an agent with
one function tool runs to completion against the fake xAI upstream (xAI's own /v1/responses)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Server, create_key, start_server, stop_server
from tests.fakes.fake_xai import FakeXAI

pytestmark = pytest.mark.e2e


def import_sdk() -> Any:
    # At test time, not collection: every xdist worker collects every module, and the SDK costs ~1.5 s of CPU
    # to import.
    return pytest.importorskip("agents", reason="the OpenAI Agents SDK (openai-agents, a dev dependency)")


def sent_bodies(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The bodies of requests the fake upstream received, oldest first."""
    return [r["body"] for r in records]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, FakeXAI]]:
    tmp = tmp_path_factory.mktemp("agents")
    with FakeXAI().start() as fake:
        config = tmp / "grokgate.yaml"
        config.write_text(f"""
backends:
  up: {{kind: xai, base_url: {fake.url}, api_key_env: XAI_KEY}}
models:
  grok-4: [{{backend: up, model: grok-4-0709}}]
""")
        srv = start_server(tmp, env={"GROKGATE_CONFIG": str(config), "XAI_KEY": "xai-test-key"}, name="agents",
                           wait_ready=False)
        yield srv, fake
        stop_server(srv)


def test_an_agent_with_a_function_tool_runs_to_completion(gw: tuple[Server, FakeXAI]) -> None:
    agents = import_sdk()
    from openai import AsyncOpenAI

    srv, fake = gw
    token, _ = create_key(srv, "agent", credits="10")
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"Sunny and 21 C in {city}."

    async def run() -> str:
        client = AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=token, max_retries=0)
        agents.set_tracing_disabled(True)  # no trace export: nothing leaves this machine
        agents.set_default_openai_client(client, use_for_tracing=False)
        agents.set_default_openai_api("responses")  # the SDK's default model class: OpenAIResponsesModel
        agent = agents.Agent(name="forecaster", instructions="Use the tool to answer.", tools=[get_weather],
                             model="grok-4")
        result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
        assert isinstance(agent.model, str)
        await client.close()
        return str(result.final_output)

    before = len(sent_bodies(fake.responses_requests))
    final = asyncio.run(run())
    assert final  # the agent answered in text after the tool's result
    assert len(calls) == 1  # the tool ran once, with arguments the model produced
    sent = sent_bodies(fake.responses_requests)[before:]
    assert len(sent) == 2  # one turn to call the tool, one to answer with its result
    second_input = json.dumps(sent[1]["input"])
    assert "function_call_output" in second_input and "Sunny and 21 C" in second_input
