"""A fake vLLM OpenAI-compatible server (``vllm serve --api-key K``): an upstream that quotes what it was sent.

What it follows (vLLM's entrypoints/openai: api_server.py, serving_chat.py, protocol.py):

* ``--api-key``: a request without ``Authorization: Bearer <key>`` gets ``401 {"error": "Unauthorized"}``.
* A body field of the wrong type (``top_k: "x"``) is refused by the request model's validation: 400, the error
  envelope ``{"error": {"message", "type", "param", "code": 400}}``, and the message is pydantic's, which quotes
  the value (``input_value='x'``). That is what makes vLLM an echoing upstream.
* An unknown ``model``: 404 in the same envelope.
* An error raised while a stream is under way comes inside the 200 stream as ``data: {"error": {..., "code":
  400}}`` then ``data: [DONE]`` (``create_streaming_error_response``: its default status is 400).
* Replies: ``chat.completion`` / ``chat.completion.chunk`` with explicit nulls, usage as OpenAI counts it,
  ``stream_options.include_usage`` adds a ``choices: []`` usage chunk before ``[DONE]``.

Test controls: ``stream_error_field`` (a streamed request carrying this body field gets the in-stream error,
quoting the field's value, after ``stream_error_after`` content chunks, default 0); ``echo_headers`` (every error
message also quotes the request's Authorization header, as a debugging proxy in front of vLLM may); ``requests``
records every request.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

INTS = ("n", "max_tokens", "max_completion_tokens", "seed", "top_k", "min_tokens", "top_logprobs")
FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


class FakeVLLM:
    def __init__(self, api_key: str = "vllm-test-key", model: str = "served-model",
                 content: str = "Hello from fake vLLM") -> None:
        self.api_key, self.model, self.content = api_key, model, content
        self.stream_error_field: str | None = None
        self.stream_error_after = 0
        self.echo_headers = False
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                     Route("/v1/models", self._models, methods=["GET"])])

    # ----- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> FakeVLLM:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        config = uvicorn.Config(self.app, log_level="critical", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake vLLM server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FakeVLLM:
        return self if self._server is not None else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ----- answers -----------------------------------------------------------------------------------------------
    def _error(self, status: int, kind: str, message: str, headers: dict[str, str], param: str | None = None
               ) -> Response:
        if self.echo_headers:
            message += f"\nrequest headers: {{'authorization': '{headers.get('authorization', '')}'}}"
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
        return Response(orjson.dumps(body), status, media_type="application/json")

    def _denied(self, headers: dict[str, str]) -> Response | None:
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return Response(orjson.dumps({"error": "Unauthorized"}), 401, media_type="application/json")
        return None

    async def _models(self, request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append({"method": "GET", "path": request.url.path, "headers": headers, "body": None})
        data = [{"id": self.model, "object": "model", "created": int(time.time()), "owned_by": "vllm"}]
        return self._denied(headers) or Response(orjson.dumps({"object": "list", "data": data}),
                                                 media_type="application/json")

    async def _chat(self, request: Request) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        body = orjson.loads(await request.body())
        self.requests.append({"method": "POST", "path": request.url.path, "headers": headers, "body": body})
        denied = self._denied(headers)
        if denied is not None:
            return denied
        problem = _validate(body)
        if problem:
            return self._error(400, "Bad Request", problem, headers)
        if body["model"] != self.model:
            return self._error(404, "NotFoundError", f"The model `{body['model']}` does not exist.", headers, "model")
        prompt = 10 + sum(len(str(m.get("content") or "").split()) for m in body["messages"])
        completion = len(self.content.split())
        usage = {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
                 "prompt_tokens_details": None}
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.get("stream"):
            message = {"role": "assistant", "content": self.content, "tool_calls": [], "reasoning_content": None}
            return Response(orjson.dumps({
                "id": ident, "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop",
                             "stop_reason": None}],
                "usage": usage, "prompt_logprobs": None}), media_type="application/json")
        base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": self.model}
        chunks: list[dict[str, Any]] = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                              "logprobs": None, "finish_reason": None}]}]
        for word in self.content.split(" "):
            chunks.append({**base, "choices": [{"index": 0, "delta": {"content": word + " "}, "logprobs": None,
                                                "finish_reason": None}]})
        field = self.stream_error_field
        if field is not None and field in body:
            error = self._error(400, "BadRequestError", f"Invalid {field}: {body[field]!r}", headers)
            before = chunks[:1 + self.stream_error_after] if self.stream_error_after else []
            return _sse([*before, orjson.loads(error.body)])
        chunks.append({**base, "choices": [{"index": 0, "delta": {"content": ""}, "logprobs": None,
                                            "finish_reason": "stop", "stop_reason": None}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append({**base, "choices": [], "usage": usage})
        return _sse(chunks)


def _sse(chunks: list[dict[str, Any]]) -> Response:
    data = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    return Response(data, media_type="text/event-stream")


def _validate(body: Any) -> str | None:
    """pydantic's message for the first field of the wrong type (vLLM's 400 carries it as it is)."""
    if not isinstance(body, dict) or "messages" not in body or "model" not in body:
        return "1 validation error for ChatCompletionRequest\nmessages\n  Field required [type=missing]"
    for name in INTS + FLOATS:
        value = body.get(name)
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool)
                             and (name in FLOATS or float(value).is_integer())):
            continue
        kind, text = ("int_parsing", "a valid integer, unable to parse string as an integer") if name in INTS \
            else ("float_parsing", "a valid number, unable to parse string as a number")
        return (f"1 validation error for ChatCompletionRequest\n{name}\n  Input should be {text} "
                f"[type={kind}, input_value={value!r}, input_type={type(value).__name__}]")
    return None
