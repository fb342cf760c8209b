"""The chat-completions wire format over the serving lifecycle: chunks for a stream, one `chat.completion`
otherwise (core/completion.py), framed by the HTTP layer (api/sse.py)."""

from __future__ import annotations

from grokgate.core.completion import ChunkFactory, CompletionAccumulator, StreamAssembler
from grokgate.core.pricing import prompt_token_bound
from grokgate.providers.base import Call
from grokgate.providers.router import prompt_shape
from grokgate.schemas.chat import ChatCompletionRequest
from grokgate.serving.lifecycle import CallOptions
from grokgate.serving.wire import Framing


class ChatWire:
    """Chat completions: `StreamAssembler` is the stream renderer, `CompletionAccumulator` the collector."""

    label = "chat completion"
    endpoint = "chat"

    def __init__(self, framing: Framing) -> None:
        self.framing = framing

    def renderer(self, request: ChatCompletionRequest, fingerprint: str) -> StreamAssembler:
        return StreamAssembler(ChunkFactory(request.model, fingerprint), request.choices, request.include_usage)

    def collector(self, request: ChatCompletionRequest, fingerprint: str) -> CompletionAccumulator:
        return CompletionAccumulator(ChunkFactory(request.model, fingerprint), request.choices)


def chat_call(request: ChatCompletionRequest, raw: bytes, options: CallOptions) -> Call:
    """A validated chat body as the lifecycle's call. The prompt's upper bound comes from the raw body (it covers
    tools, schemas and tool-call arguments as well as message text: core/pricing.py)."""
    return options.call(request, prompt_token_bound(raw, prompt_shape(request)))
