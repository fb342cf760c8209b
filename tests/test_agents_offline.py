"""An agent offline: the OpenAI Agents SDK with its chat-completions model class (OpenAIChatCompletionsModel) on the
embedded local model runs a one-tool agent to completion, with no key, no network and no cost
(tool calls decoded by providers/local_tools.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import Server, wait_idle

pytestmark = pytest.mark.e2e


def test_a_tool_using_agent_runs_to_completion_on_the_local_model(server: Server) -> None:
    # Imported here, not at collection: every xdist worker collects every module (~1.5 s of CPU for the SDK).
    agents = pytest.importorskip("agents", reason="the OpenAI Agents SDK (openai-agents, a dev dependency)")
    from openai import AsyncOpenAI

    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"Sunny and 21 C in {city}."

    async def run() -> str:
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=300)
        agents.set_tracing_disabled(True)  # no trace export: nothing leaves this machine
        model = agents.OpenAIChatCompletionsModel(model="grok-3", openai_client=client)
        agent = agents.Agent(
            name="forecaster", instructions="Use the tool to answer.", tools=[get_weather], model=model,
            # The first turn must call the tool; after it, the SDK resets tool_choice to auto (its default
            # reset_tool_choice), so the model may answer in text. Greedy (top_p 0 keeps only the likeliest
            # token) yet with a temperature above 0 and no seed, so the engine's prompt cache serves the second
            # turn the first turn's prompt (temperature 0 would have it evaluated afresh: providers/local.py).
            model_settings=agents.ModelSettings(tool_choice="required", max_tokens=80, temperature=1, top_p=0),
        )
        result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
        await client.close()
        return str(result.final_output)

    wait_idle(server)  # the session's shared server: no other test's job left to share a batch with these
    final = asyncio.run(run())
    assert final  # the agent ended with a text answer after the tool's result
    assert calls and all(isinstance(c, str) and c for c in calls)  # the tool ran with arguments the model produced


def test_an_agent_at_its_defaults_calls_the_tool_it_is_offered(server: Server) -> None:
    # tool_choice auto (the SDK's default) and instructions that leave the choice to the model: the model writes
    # its call as bare JSON far more often than in the template's <tool_call> block, and that must count as a call.
    agents = pytest.importorskip("agents", reason="the OpenAI Agents SDK (openai-agents, a dev dependency)")
    from openai import AsyncOpenAI

    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"Sunny and 21 C in {city}."

    async def run() -> str:
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=300)
        agents.set_tracing_disabled(True)
        model = agents.OpenAIChatCompletionsModel(model="grok-3", openai_client=client)
        # One seed of bench/agents_offline.py's ten (`auto`); the SDK has no seed setting: extra_args reach the body.
        agent = agents.Agent(name="assistant", instructions="Use tools when useful.", tools=[get_weather],
                             model=model, model_settings=agents.ModelSettings(extra_args={"seed": 0}))
        try:
            result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
        finally:
            await client.close()
        return str(result.final_output)

    wait_idle(server)
    final = asyncio.run(run())
    assert len(calls) == 1 and "paris" in calls[0].lower(), calls  # a call was made, on the model's arguments
    assert final  # and the loop ended with a text answer after the result
