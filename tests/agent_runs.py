"""One run of an OpenAI Agents SDK agent with a weather tool against a grokgate server (the agent tests' shared
set-up): the chat-completions model class, tracing off (nothing leaves this machine), the client closed after."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Server, wait_idle


def run_weather_agent(server: Server, **agent: Any) -> tuple[Any, list[str]]:
    """The result of asking "What is the weather in Paris?" (at most 4 turns), and the cities the tool was called
    with. `agent` holds the Agent's settings (instructions, model_settings, output_type...)."""
    # Imported here, not at collection: every xdist worker collects every module (~1.5 s of CPU for the SDK).
    agents = pytest.importorskip("agents", reason="the OpenAI Agents SDK (openai-agents, a dev dependency)")
    from openai import AsyncOpenAI

    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"Sunny and 21 C in {city}."

    async def run() -> Any:
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=300)
        agents.set_tracing_disabled(True)
        model = agents.OpenAIChatCompletionsModel(model="grok-3", openai_client=client)
        try:
            return await agents.Runner.run(agents.Agent(tools=[get_weather], model=model, **agent),
                                           "What is the weather in Paris?", max_turns=4)
        finally:
            await client.close()

    wait_idle(server)  # the session's shared server: no other test's job left to share a batch with these
    return asyncio.run(run()), calls
