"""One request on the embedded engine (providers/local.py): a job per choice, run by a worker thread, and the
request's events merged from its jobs.

A job's callback (`Job.on_chunk`) runs in the worker thread, inside llama.cpp's call: it translates each chunk and
hands the event to the event loop with `call_soon_threadsafe`. It also keeps the evidence providers/local_slots.py
needs about the slot the job ran in: whether its prompt was evaluated there, or refused before it reached it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Event, Finish, Origin, Usage, UsageReport
from grokgate.providers.local_errors import engine_error
from grokgate.providers.local_slots import PromptDigests
from grokgate.providers.local_tools import MAX_CALLS, ToolPlan, continuation, parser_for

if TYPE_CHECKING:
    from grokgate.providers.local import LocalEngine


_ENOUGH = 16  # output tokens a continuation needs to hold one more call


class JobEnd:
    __slots__ = ("usage",)

    def __init__(self, usage: Usage | None) -> None:
        self.usage = usage


class Job:
    """One choice of one request, run by one worker thread."""

    __slots__ = ("cancelled", "continued", "created", "earlier", "evaluated", "exclusive", "fallback", "generated",
                 "index", "long", "loop", "parser", "payload", "plan", "prompt", "queue", "refused", "resumable",
                 "started", "tenant", "timings", "usage")

    def __init__(self, index: int, payload: dict[str, Any], loop: asyncio.AbstractEventLoop,
                 queue: asyncio.Queue[Any], exclusive: bool, plan: ToolPlan | None = None, tenant: str = "",
                 prompt: PromptDigests | None = None, answered: frozenset[str] = frozenset()) -> None:
        self.index = index
        self.exclusive = exclusive
        self.payload = payload
        self.tenant = tenant
        self.prompt = prompt or PromptDigests(payload.get("messages") or [])
        self.evaluated = False  # the engine reported counts: its prompt was evaluated in the slot (local_slots.py)
        self.refused = False  # the engine refused it before evaluating anything: the slot is as it was
        self.long = False  # its prompt is likely too long: it came through the tenant's lane (local_slots.py)
        self.loop = loop
        self.queue = queue
        self.cancelled = False
        self.created = time.monotonic()
        self.started = False
        self.generated = 0
        self.usage: Usage | None = None
        self.timings: dict[str, Any] | None = None  # llama.cpp's running counts, for a job stopped before its usage
        # Calls are decoded by grokgate (providers/local_tools.py): the engine streams them as text.
        self.plan = plan
        self.parser = parser_for(plan, answered, payload.get("messages")) if plan is not None else None
        # The payload to answer with when the model only repeats an answered call (providers/local.py), and what
        # the earlier generations consumed.
        self.fallback: dict[str, Any] | None = None
        self.earlier: Usage | None = None
        self.resumable = False  # the model ended after its calls: a continuation may add parallel ones
        self.continued = False

    def answer_again(self) -> dict[str, Any] | None:
        """The payload of one more generation, or None: after a repeated answered call, the answer as with
        tool_choice "none"; after calls the model ended on, a continuation that may add parallel calls (see
        providers/local_tools.py `continuation`). Within what is left of the output cap; usage adds up."""
        if self.parser is None or self.cancelled:
            return None
        if self.parser.retry and self.fallback is not None:
            payload, self.parser = dict(self.fallback), None
        elif self.resumable and self.plan is not None:
            self.resumable, self.continued = False, True
            payload = continuation(self.payload, self.plan, self.parser.made)
            self.parser.resume()
        else:
            return None
        first = self.consumed() or Usage()
        self.earlier, self.usage, self.timings = first, None, None
        if "max_tokens" in payload:
            left = int(payload["max_tokens"]) - first.completion_tokens
            if left < _ENOUGH and self.parser is not None:  # no room for a call: the answer stands
                self.post(Finish(index=self.index, reason="tool_calls"))
                return None
            payload["max_tokens"] = max(1, left)
        return payload

    def end(self) -> None:
        """After the last generation: a finish held for a continuation that did not run is sent."""
        if self.resumable:
            self.resumable = False
            self.post(Finish(index=self.index, reason="tool_calls"))

    def consumed(self) -> Usage | None:
        """The engine's usage report or, for a job aborted before it (the client left, a repeated tool call), the
        running counts of its last chunk (`timings_per_token`): counted, not estimated (a token or two the engine
        decodes before it sees the abort go unbilled, never the other way)."""
        if self.usage is not None or self.timings is None:
            latest = self.usage
        else:
            cached = int(self.timings.get("cache_n", 0))
            latest = Usage(prompt_tokens=cached + int(self.timings.get("prompt_n", 0)),
                           completion_tokens=int(self.timings.get("predicted_n", 0)), cached_tokens=cached)
        if self.earlier is None:
            return latest
        later = latest or Usage()
        # A continuation extends the same answer (its prompt is the first one, held in the slot, plus the calls
        # already made): the prompt is billed once, as for the choices of one request, and the output adds up.
        # The answer after a repeated call is another prompt, billed as well (prompt_copies covers it).
        again = not self.continued
        return Usage(prompt_tokens=self.earlier.prompt_tokens + (later.prompt_tokens if again else 0),
                     completion_tokens=self.earlier.completion_tokens + later.completion_tokens,
                     cached_tokens=self.earlier.cached_tokens + (later.cached_tokens if again else 0))

    def post(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def on_chunk(self, chunk: dict[str, Any]) -> bool:
        """Engine callback (worker thread): translate one chunk; True aborts the generation."""
        if self.cancelled:
            return True
        error = chunk.get("error")
        if error is not None:
            # llama.cpp checks a request (its context size above all) before the prompt touches the slot's KV
            # cache (tools/server/server-context.cpp `update_slots`); a 5xx may come from anywhere.
            code = error.get("code") if isinstance(error, dict) else None
            self.refused = not self.evaluated and isinstance(code, int) and 400 <= code < 500
            self.post(engine_error(error, self.payload))
            return True
        timings = chunk.get("timings")
        if timings is not None:
            self.timings = timings
            self.evaluated = True
        usage = chunk.get("usage")
        if usage:
            self.evaluated = True
            details = usage.get("prompt_tokens_details") or {}
            self.usage = Usage(
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
                cached_tokens=int(details.get("cached_tokens", 0)),
            )
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            content = delta.get("content")
            tool_calls = delta.get("tool_calls")
            reasoning = delta.get("reasoning_content")
            logprobs = choice.get("logprobs")
            if content or tool_calls or reasoning:
                self.generated += 1
            try:
                if content and self.parser is not None:  # a call's text becomes tool-call fragments
                    content, calls = self.parser.feed(content)
                    logprobs, tool_calls = logprobs if content else None, calls or None
                reason = choice.get("finish_reason")
                if self.parser is not None and self.parser.retry and self.fallback is not None:
                    return True  # ends this generation; `answer_again` starts the next
                if (reason == "stop" and self.parser is not None and self.parser.calls and not self.parser.done
                        and not self.continued and self.plan is not None and self.plan.parallel
                        and self.parser.calls < MAX_CALLS):
                    self.resumable = True  # the finish waits for the continuation (`answer_again`)
                    if content or tool_calls:
                        self.post(Delta(index=self.index, content=content or None, tool_calls=tool_calls))
                    return True
                if self.parser is not None and (reason or self.parser.done):
                    if held := self.parser.flush():  # text the parser held to see what followed it
                        content = (content or "") + held
                    reason = self.parser.finish(reason or "stop")
                    self.cancelled |= self.parser.done  # ends the generation; `timings` count what it used
            except GatewayError as exc:
                self.post(exc)
                return True
            if content or tool_calls or reasoning:
                self.post(Delta(
                    index=self.index,
                    content=content or None,
                    logprobs=logprobs.get("content") if logprobs else None,
                    tool_calls=tool_calls,
                    reasoning_content=reasoning,
                ))
            if reason:
                self.post(Finish(index=self.index, reason=reason))
        return self.cancelled


class LocalGeneration:
    """Events of one request, merged from its n jobs; usage is reported once, when all jobs ended."""

    def __init__(self, engine: LocalEngine, jobs: list[Job], queue: asyncio.Queue[Any],
                 prompt_estimate: int) -> None:
        self._engine = engine
        self._prompt_estimate = prompt_estimate
        self._jobs = jobs
        self._queue = queue
        self._open = len(jobs)
        self._closed = False

    @property
    def backend(self) -> str:
        return self._engine.name

    @property
    def fingerprint(self) -> str:
        return self._engine.fingerprint

    @property
    def origin(self) -> Origin:
        return "live"

    def __aiter__(self) -> LocalGeneration:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._open == 0:
                if self._closed:
                    raise StopAsyncIteration
                self._closed = True
                return UsageReport(self._merged_usage())
            item = await self._queue.get()
            if isinstance(item, JobEnd):
                self._open -= 1
                continue
            if isinstance(item, GatewayError):
                await self.aclose()
                raise item
            event: Event = item
            return event

    def _merged_usage(self) -> Usage:
        # The prompt is shared by the choices, so it is counted once; outputs add up.
        consumed = [j.consumed() for j in self._jobs]
        first = max((u for u in consumed if u is not None), key=lambda u: u.prompt_tokens, default=Usage())
        usage = Usage(
            prompt_tokens=first.prompt_tokens,
            cached_tokens=first.cached_tokens,
            completion_tokens=sum(u.completion_tokens if u else job.generated
                                  for job, u in zip(self._jobs, consumed, strict=True)),
        )
        if usage.prompt_tokens == 0 and any(j.started for j in self._jobs):
            # A job stopped before its first chunk counted anything (the client left during the prompt's
            # evaluation) has its prompt estimated from its length, and the row says so.
            usage.prompt_tokens = self._prompt_estimate
            usage.estimated = True
        return usage

    def usage_so_far(self) -> Usage:
        """What was consumed up to now, for a request that ends early."""
        return self._merged_usage()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for job in self._jobs:
            job.cancelled = True
        self._engine.discard(self)
