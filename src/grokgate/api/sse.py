"""Server-Sent Events framing, the streaming response, and the one way grokgate notices a client that left.

Framing: chat's `data: <one-line JSON>\\n\\n` per payload (the Responses API's adds an `event:` line),
`: keep-alive` comments during silences, `data: [DONE]` last for chat completions; an error after the first
byte is one more payload, and then nothing (the wire format decides: serving/wire.py). What the payloads are and
when the stream settles is the serving layer's
(serving/lifecycle.py); this module only writes bytes and watches the connection.
"""

from __future__ import annotations

from typing import Any

import anyio
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class SSEFraming:
    """`data:` frames (a `serving.wire.Framing`); `done` is the end marker of a complete stream."""

    keepalive = KEEPALIVE

    frame = staticmethod(frame)

    def __init__(self, done: bytes) -> None:
        self.done = done


CHAT_SSE = SSEFraming(done=DONE)


class EventFraming:
    """The Responses API's frames: `event: <type>` then `data: <JSON>` per payload (the payload's `type`, as the
    openai SDK's `responses.stream()` reads them), keep-alive comments, and no end marker: the stream ends after
    its `response.completed` / `.incomplete` / `.failed` event."""

    keepalive = KEEPALIVE
    done = b""

    @staticmethod
    def frame(payload: dict[str, Any]) -> bytes:
        return b"event: " + str(payload.get("type", "message")).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


RESPONSES_SSE = EventFraming()


async def until_disconnected(receive: Receive) -> None:
    """Returns when the client has gone away. The stream path (SSEResponse, through Starlette) and the collect
    path (serving/lifecycle.py, given this as `until_gone`) both watch the connection with it."""
    while (await receive())["type"] != "http.disconnect":
        pass


class SSEResponse(StreamingResponse):
    """A streaming response that always closes its body, shielded, however the stream ends: the body's ending is
    where the request settles (serving/lifecycle.py `Streamed.aclose`), also when it was never read."""

    media_type = "text/event-stream"

    async def listen_for_disconnect(self, receive: Receive) -> None:
        await until_disconnected(receive)  # Starlette cancels the body when this returns

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
