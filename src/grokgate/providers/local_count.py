"""The embedded engine's prompt, counted exactly before admission, so that its reservation is tight.

A request's reservation holds a true upper bound of its prompt (core/pricing.py `prompt_token_bound`): the body's
bytes plus a template allowance, about ten times what a short prompt costs on the local model ("hi" is bounded by
355 tokens and billed 30). The local engine can do better: its own chat template and tokenizer say exactly what the
prompt will be, before anything is reserved. llama.cpp's HTTP listener (on the engine's private Unix socket,
providers/local.py `_load`) renders a chat request as its chat completions do (`POST /apply-template`: the same
parse of the same payload, so the same template, messages and prefill) and tokenizes the text as they do (`POST
/tokenize` with `add_special` and `parse_special`, as llama.cpp tokenizes a chat prompt). The engine's
`prompt_tokens` for that payload (cached plus evaluated) is that count, so the count is exact, and so a true bound.

Bounded in cost: only a prompt whose body bound is at most COUNT_MAX_TOKENS is counted (two small requests on the
listener: under a millisecond for a short prompt, about 4 ms for 4 KiB, bench/prompt_count.py); a larger one keeps
the body bound, a few times its cost (a 15 KiB prompt took 14 ms to count, and 64 of them at once over 0.5 s).
The listener has one thread, which a slot save or a long Tokenize call may hold: a count that has not answered
within COUNT_TIMEOUT_SECONDS is given up, and the request keeps its body bound. A count that fails for any reason
does the same: counting only ever replaces a bound with the exact figure.

Blocking I/O: in a worker thread of its own (`PromptCounting`), never on the event loop; tenants' counts in turn.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
from typing import Any

import orjson

from grokgate.core.fairqueue import FairQueue
from grokgate.providers.local_cache import _UnixConnection

# Body bounds (core/pricing.py) up to which the prompt is counted: about 4 KiB of text, counted in about 4 ms
# (llama.cpp's tokenizer runs at about 1 MB/s here: bench/prompt_count.py). The tightness matters most for short
# prompts, whose bound is mostly the template's allowance (256 tokens).
COUNT_MAX_TOKENS = 4096
# How long admission waits for a count before it keeps the body bound (the listener may be saving a slot).
COUNT_TIMEOUT_SECONDS = 0.5


class CountFailed(Exception):
    """The listener did not answer with a count: the caller keeps its bound."""


def _post(socket_path: str, api_key: str, path: str, body: bytes, timeout: float) -> Any:
    conn = _UnixConnection(socket_path, timeout)
    try:
        conn.request("POST", path, body=body,
                     headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                              "Connection": "close"})
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:  # TimeoutError is an OSError
        raise CountFailed(str(exc)) from None
    finally:
        conn.close()
    if response.status != 200:
        raise CountFailed(f"{path} answered {response.status}")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise CountFailed(f"{path} answered no JSON") from None


def engine_prompt_tokens(socket_path: str, api_key: str, payload: dict[str, Any],
                         timeout: float = COUNT_TIMEOUT_SECONDS) -> int:
    """The tokens of the prompt llama.cpp's chat completions make of `payload` (the engine request of
    providers/local.py `_payload`); CountFailed when the listener does not say."""
    rendered = _post(socket_path, api_key, "/apply-template", orjson.dumps(payload), timeout)
    prompt = rendered.get("prompt") if isinstance(rendered, dict) else None
    if not isinstance(prompt, str):
        raise CountFailed("/apply-template answered no prompt")
    body = orjson.dumps({"content": prompt, "add_special": True, "parse_special": True})
    answer = _post(socket_path, api_key, "/tokenize", body, timeout)
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list):
        raise CountFailed("/tokenize answered no tokens")
    return len(tokens)


class _Count:
    __slots__ = ("future", "loop", "payload")

    def __init__(self, payload: dict[str, Any], loop: asyncio.AbstractEventLoop,
                 future: asyncio.Future[int | None]) -> None:
        self.payload = payload
        self.loop = loop
        self.future = future


class PromptCounting:
    """Counts prompts in a thread of its own (the listener answers one call at a time, so more threads would only
    queue there), taking the tenants' counts in turn (core/fairqueue.py): a tenant that sends many prompts at once
    delays another's count by one of its own, not by all of them."""

    def __init__(self, max_tokens: int = COUNT_MAX_TOKENS, timeout: float = COUNT_TIMEOUT_SECONDS) -> None:
        self.max_tokens = max_tokens
        self.timeout = timeout
        self._queue: FairQueue[_Count] = FairQueue()
        self._listener: tuple[str, str] | None = None
        self._worker: threading.Thread | None = None

    def worth(self, bound: int) -> bool:
        """Whether a prompt bounded by `bound` tokens is cheap enough to count."""
        return bound <= self.max_tokens

    async def count(self, listener: tuple[str, str], tenant: str, payload: dict[str, Any]) -> int | None:
        """The prompt's tokens, or None when the listener did not say in time (the caller keeps its bound)."""
        if self._worker is None:
            self._listener = listener
            self._worker = threading.Thread(target=self._work, name="local-count", daemon=True)
            self._worker.start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int | None] = loop.create_future()
        try:
            self._queue.put_group(tenant, [_Count(payload, loop, future)])
        except RuntimeError:  # closed: the engine is shutting down
            return None
        try:
            # Cancelled on timeout: a count still queued is skipped, one in progress ends at its socket timeout.
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            return None

    def _work(self) -> None:
        assert self._listener is not None
        socket_path, key = self._listener
        while (job := self._queue.get()) is not None:
            if job.future.done():  # its request gave up waiting (or left)
                continue
            try:
                result: int | None = engine_prompt_tokens(socket_path, key, job.payload, self.timeout)
            except CountFailed:
                result = None
            try:
                job.loop.call_soon_threadsafe(_resolve, job.future, result)
            except RuntimeError:  # the loop is closed
                pass

    def close(self) -> None:
        self._queue.close()


def _resolve(future: asyncio.Future[int | None], result: int | None) -> None:
    if not future.done():
        future.set_result(result)
