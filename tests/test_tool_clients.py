"""Tool calls through the client libraries people use, at their defaults (tool_choice auto, no temperature), on
the embedded model: the AI SDK's streamText with @ai-sdk/xai (JavaScript, tests/js), the openai SDK's stream
helper, and LangChain's ChatOpenAI. Each needs whole calls, as xAI streams them: one delta per call with its name
and all its arguments (../shared/spec/api-contract.md 2.5), and an answer that ends `tool_calls`, not `length`.
e2e: every generation costs seconds of CPU, so each test asks for as few as shows its point."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import Server, wait_idle

pytestmark = pytest.mark.e2e

JS = Path(__file__).resolve().parent / "js"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = "What is the weather in Paris?"


def in_paris(arguments: Any) -> bool:
    return isinstance(arguments, dict) and set(arguments) == {"city"} and "paris" in str(arguments["city"]).lower()


def parsed(arguments: str) -> Any:
    """The arguments' JSON, or None where they are not whole (a fragment of a call streamed in pieces)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return None


def node_script(name: str, *args: str) -> dict[str, Any]:
    """Run tests/js/<name> with node; its last stdout line is JSON."""
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "ai").is_dir():
        pytest.skip("the JavaScript clients are not installed: node and `npm ci --prefix tests/js` (make test's "
                    "set-up does it where npm exists)")
    done = subprocess.run([node, str(JS / name), *args], capture_output=True, text=True, timeout=300, cwd=JS)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# `chat`: @ai-sdk/xai 4's xai.chat, the chat-completions model, which takes each streamed tool-call delta as a whole
# call (as xAI sends them): OpenAI-style fragments became one call with empty input and a validation error per
# chunk. `responses`: @ai-sdk/xai 5's default model (xAI's Responses API).
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_ai_sdk_stream_text_runs_the_tool(server: Server, api: str) -> None:
    wait_idle(server)  # the session's shared server: no other test's job left to share a batch with this one
    out = node_script("stream_text.mjs", f"{server.url}/v1", server.token, api)
    assert out["errors"] == [], out
    assert len(out["calls"]) == 1 and out["calls"][0]["name"] == "get_weather", out
    assert not out["calls"][0]["invalid"] and in_paris(out["calls"][0]["input"]), out
    assert len(out["executed"]) == 1 and in_paris(out["executed"][0]), out  # the tool ran, with parsed arguments
    assert out["results"][0]["output"]["sky"] == "sunny", out  # and its result came back into the stream
    assert out["finishReason"] == "tool-calls", out


def test_openai_stream_helper_gets_whole_calls(server: Server) -> None:
    wait_idle(server)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.token, max_retries=0, timeout=300)
    fragments: list[str] = []
    done: list[tuple[str, str]] = []
    # The helper raises LengthFinishReasonError on an answer that ends `length` (a runaway call cut by the cap).
    with client.chat.completions.stream(model="grok-3", messages=[{"role": "user", "content": ASK}],
                                        tools=[WEATHER]) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                fragments.append(event.arguments_delta)
            elif event.type == "tool_calls.function.arguments.done":
                done.append((event.name, event.arguments))
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert done and all(name == "get_weather" and in_paris(parsed(args)) for name, args in done), done
    # xAI's shape: each call's arguments in one delta, whole (OpenAI sends them in fragments).
    assert fragments == [args for _, args in done], fragments
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == len(done)


def test_langchain_bind_tools_stream_and_invoke(server: Server) -> None:
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai (a dev dependency)")
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather of a city."""
        return f"Sunny in {city}."

    wait_idle(server)
    llm = langchain_openai.ChatOpenAI(model="grok-3", base_url=f"{server.url}/v1", api_key=server.token,
                                      max_retries=0, timeout=300).bind_tools([get_weather])
    streamed: Any = None
    pieces = []
    for chunk in llm.stream(ASK):
        streamed = chunk if streamed is None else streamed + chunk
        pieces += chunk.tool_call_chunks
    # Each call came whole in one chunk (xAI's shape): its id, name and all its arguments, parsed as they arrive.
    assert pieces, streamed
    assert all(p["id"] and p["name"] == "get_weather" and in_paris(parsed(p["args"])) for p in pieces), pieces
    invoked = llm.invoke(ASK)
    for message in (streamed, invoked):
        assert message.invalid_tool_calls == [], message
        assert len(message.tool_calls) == 1 and message.tool_calls[0]["name"] == "get_weather", message
        assert in_paris(message.tool_calls[0]["args"]), message  # parsed arguments, whole
        assert message.response_metadata.get("finish_reason") == "tool_calls", message
