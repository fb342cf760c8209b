"""The Responses API's guards, in-process: over-long part lists refused before validation, reasoning items that
reach no backend never stored, the memory store honest about what it drops."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from grokgate.api.body import parse_responses_raw
from grokgate.core.admission import Principal
from grokgate.core.errors import GatewayError
from grokgate.core.responses import StoredResponse
from grokgate.core.tenancy import tenant_of
from grokgate.observability.metrics import Metrics
from grokgate.serving import CallOptions
from grokgate.serving.responses import ResponsesService
from grokgate.store.responses_memory import MemoryResponseStore


@pytest.mark.parametrize("field", ["content", "output"])
def test_part_lists_are_counted_before_validation(field: str) -> None:
    """A function_call_output's `output` parts count like a message's `content` parts (before: only content)."""
    parts = [{"type": "input_text", "text": ""}] * 9000
    item = ({"type": "message", "role": "user", "content": parts} if field == "content"
            else {"type": "function_call_output", "call_id": "c", "output": parts})
    raw = orjson.dumps({"model": "grok-3", "input": [item]})
    with pytest.raises(GatewayError) as refused:
        parse_responses_raw(raw, max_messages=2048)  # at most 4 x 2048 parts
    assert refused.value.status == 400 and refused.value.param == f"input[0].{field}"


def test_reasoning_without_encrypted_content_is_neither_sent_nor_stored() -> None:
    store = MemoryResponseStore(1 << 20)
    service = ResponsesService(store, Metrics(), framing=None,  # type: ignore[arg-type]
                               retention_ms=60_000, max_stored_bytes=1 << 20, max_chain_bytes=1 << 20,
                               max_messages=64)
    body = parse_responses_raw(orjson.dumps({"model": "grok-3", "input": [
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "x" * 100_000}]},
        {"role": "user", "content": "hi"}]}), max_messages=64)

    async def run() -> None:
        owner = tenant_of(Principal(key_id="k", token_id=1, account_id=1))
        call, wire = await service.prepare(body, CallOptions(owner, "req", 0.0))
        assert [i["type"] for i in wire.input_items] == ["message"]
        assert "x" * 1000 not in orjson.dumps(call.request.responses_body).decode()
        assert call.prompt_tokens < 10_000  # the 100 kB summary is not in the bound either: it is not sent

    asyncio.run(run())


def test_memory_store_says_none_for_what_it_cannot_keep() -> None:
    store = MemoryResponseStore(max_bytes=2048)
    big = StoredResponse("resp_big", "token:1", 1, 10**13, None, [{"type": "message", "content": "x" * 4096}],
                         {"id": "resp_big", "output": []})

    async def run() -> None:
        assert await store.save(big) is None  # larger than the whole store: not kept, and not claimed kept
        assert await store.get("token:1", "resp_big") is None

    asyncio.run(run())


def test_a_backend_error_names_the_field_the_responses_request_sent() -> None:
    """Backends check the chat request a Responses body is translated to; their errors name Responses' fields
    (before: `response_format` for a request that sent `text.format`, a function's index among functions)."""
    from grokgate.schemas.responses import ResponsesRequest
    from grokgate.serving.responses import responses_param

    body = ResponsesRequest.model_validate({"model": "grok-3", "input": "hi", "tools": [
        {"type": "web_search"}, {"type": "function", "name": "f", "parameters": {"type": "object"}}]})
    assert responses_param("response_format", body) == "text.format"
    assert responses_param("response_format.json_schema", body) == "text.format.json_schema"
    assert responses_param("tools[0].function.parameters", body) == "tools[1].parameters"
    assert responses_param("max_completion_tokens", body) == "max_output_tokens"
    assert responses_param("messages[3].content", body) == "input"
    assert responses_param("tool_choice", body) == "tool_choice" and responses_param(None, body) is None
