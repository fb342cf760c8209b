"""An agent offline: the OpenAI Agents SDK with its chat-completions model class (OpenAIChatCompletionsModel) on the
embedded local model runs a one-tool agent to completion, with no key, no network and no cost
(tool calls decoded by providers/local_tools.py)."""

from __future__ import annotations

import pytest

from tests.agent_runs import run_weather_agent
from tests.conftest import Server

pytestmark = pytest.mark.e2e


def test_a_tool_using_agent_runs_to_completion_on_the_local_model(server: Server) -> None:
    agents = pytest.importorskip("agents", reason="the OpenAI Agents SDK (openai-agents, a dev dependency)")
    result, calls = run_weather_agent(
        server, name="forecaster", instructions="Use the tool to answer.",
        # The first turn must call the tool; after it, the SDK resets tool_choice to auto (its default
        # reset_tool_choice), so the model may answer in text. Greedy (top_p 0 keeps only the likeliest
        # token) yet with a temperature above 0 and no seed, so the engine's prompt cache serves the second
        # turn the first turn's prompt (temperature 0 would have it evaluated afresh: providers/local.py).
        model_settings=agents.ModelSettings(tool_choice="required", max_tokens=80, temperature=1, top_p=0))
    assert str(result.final_output)  # the agent ended with a text answer after the tool's result
    assert calls and all(isinstance(c, str) and c for c in calls)  # the tool ran with arguments the model produced


def test_an_agent_at_its_defaults_calls_the_tool_it_is_offered(server: Server) -> None:
    # tool_choice auto (the SDK's default) and instructions that leave the choice to the model: the model writes
    # its call as bare JSON far more often than in the template's <tool_call> block, and that must count as a call.
    agents = pytest.importorskip("agents", reason="the OpenAI Agents SDK (openai-agents, a dev dependency)")
    # One seed of bench/agents_offline.py's ten (`auto`); the SDK has no seed setting: extra_args reach the body.
    result, calls = run_weather_agent(server, name="assistant", instructions="Use tools when useful.",
                                 model_settings=agents.ModelSettings(extra_args={"seed": 0}))
    assert len(calls) == 1 and "paris" in calls[0].lower(), calls  # a call was made, on the model's arguments
    assert str(result.final_output)  # and the loop ended with a text answer after the result
