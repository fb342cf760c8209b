"""Chat payloads -> xAI's protobuf messages: a collected chat completion object (core/completion.py) as a
`GetChatCompletionResponse`, a stream's chunk payloads (serving/xai_chat.py) as `GetChatCompletionChunk` bytes.

Every output carries the assistant role (xai-sdk keeps only assistant outputs); a tool call is whole, and one
whose arguments are not JSON is left out (see serving/xai_chat.py). Usage in xAI's `SamplingUsage`: grokgate's
counts, the prompt all text; `cost_in_usd_ticks` is left unset (what xAI charges the operator is the operator's
business: the ledger keeps it, the client pays grokgate's price).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from xai_sdk.proto.v6 import chat_pb2, sample_pb2, usage_pb2

from grokgate.core.events import Usage
from grokgate.core.usage import normalise_usage
from grokgate.serving.wire import Payload
from grokgate.serving.xai_chat import whole_calls

ASSISTANT = chat_pb2.ROLE_ASSISTANT
_FINISH = {"stop": sample_pb2.REASON_STOP, "length": sample_pb2.REASON_MAX_LEN,
           "tool_calls": sample_pb2.REASON_TOOL_CALLS, "function_call": sample_pb2.REASON_TOOL_CALLS}


def finish_reason(reason: str | None) -> int:
    return int(_FINISH.get(reason or "stop", sample_pb2.REASON_STOP))


def sampling_usage(usage: Usage) -> usage_pb2.SamplingUsage:
    message = usage_pb2.SamplingUsage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens, reasoning_tokens=usage.reasoning_tokens,
        prompt_text_tokens=usage.prompt_tokens, cached_prompt_text_tokens=usage.cached_tokens)
    return message


def tool_calls(calls: list[dict[str, Any]]) -> list[chat_pb2.ToolCall]:
    return [chat_pb2.ToolCall(id=c.get("id") or "", type=chat_pb2.TOOL_CALL_TYPE_CLIENT_SIDE_TOOL,
                              status=chat_pb2.TOOL_CALL_STATUS_COMPLETED,
                              function=chat_pb2.FunctionCall(name=c["function"]["name"],
                                                             arguments=c["function"]["arguments"]))
            for c in calls]


def logprobs(entries: list[Any] | None) -> chat_pb2.LogProbs | None:
    if not entries:
        return None
    out = chat_pb2.LogProbs()
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        item = out.content.add(token=str(entry.get("token", "")), logprob=float(entry.get("logprob") or 0.0),
                               bytes=_bytes(entry.get("bytes")))
        for top in entry.get("top_logprobs") or ():
            if isinstance(top, dict):
                item.top_logprobs.add(token=str(top.get("token", "")), logprob=float(top.get("logprob") or 0.0),
                                      bytes=_bytes(top.get("bytes")))
    return out


def _bytes(value: Any) -> bytes:
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value)
    return b""


def completion_response(completion: Payload) -> chat_pb2.GetChatCompletionResponse:
    """A chat completion object (`chat.completion`) as xAI's answer."""
    outputs = []
    for choice in completion["choices"]:
        message = choice["message"]
        reason = choice.get("finish_reason")
        calls, dropped = whole_calls({i: c for i, c in enumerate(message.get("tool_calls") or ())})
        out = chat_pb2.CompletionOutput(
            index=choice["index"], finish_reason=finish_reason("length" if dropped else reason),
            message=chat_pb2.CompletionMessage(role=ASSISTANT, content=message.get("content") or "",
                                               reasoning_content=message.get("reasoning_content") or "",
                                               tool_calls=tool_calls(calls)))
        probs = logprobs((choice.get("logprobs") or {}).get("content"))
        if probs is not None:
            out.logprobs.CopyFrom(probs)
        outputs.append(out)
    response = chat_pb2.GetChatCompletionResponse(
        id=completion["id"], outputs=outputs, model=completion["model"],
        system_fingerprint=completion.get("system_fingerprint") or "",
        created=Timestamp(seconds=int(completion["created"])),
        usage=sampling_usage(normalise_usage(completion["usage"])))
    citations = completion.get("citations")
    if isinstance(citations, list):
        response.citations.extend(c for c in citations if isinstance(c, str))
    return response


def chunk_message(chunk: Payload) -> chat_pb2.GetChatCompletionChunk:
    """A stream payload of serving/xai_chat.py as xAI's chunk."""
    outputs = []
    for output in chunk["outputs"]:
        delta = chat_pb2.Delta(role=ASSISTANT, content=output.get("content", ""),
                               reasoning_content=output.get("reasoning_content", ""))
        calls = output.get("tool_calls")
        if calls:
            delta.tool_calls.extend(tool_calls(calls))
        out = chat_pb2.CompletionOutputChunk(index=output["index"], delta=delta)
        reason = output.get("finish_reason")
        if reason is not None:
            out.finish_reason = finish_reason(reason)
        probs = logprobs(output.get("logprobs"))
        if probs is not None:
            out.logprobs.CopyFrom(probs)
        outputs.append(out)
    message = chat_pb2.GetChatCompletionChunk(id=chunk["id"], outputs=outputs, model=chunk["model"],
                                              system_fingerprint=chunk["system_fingerprint"],
                                              created=Timestamp(seconds=chunk["created"]))
    usage = chunk.get("usage")
    if usage is not None:
        message.usage.CopyFrom(sampling_usage(usage))
    citations = chunk.get("citations")
    if citations:
        message.citations.extend(citations)
    return message


class ChunkFraming:
    """A stream's payloads as serialized `GetChatCompletionChunk`s: the RPC sends the bytes as they are."""

    keepalive = b""  # gRPC keeps its connection alive itself (HTTP/2 pings)
    done = b""  # the stream's end is the RPC's status

    def frame(self, payload: Payload) -> bytes:
        data: bytes = chunk_message(payload).SerializeToString()
        return data


FRAMING = ChunkFraming()
