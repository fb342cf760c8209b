"""The embedded engine: llama.cpp (through xllamacpp) in-process, with continuous batching over slots.

Each choice of a request is one engine job (n=1), so `n` up to 128 works whatever the slot count: jobs
wait in a fair queue and `slots` worker threads feed them to the engine, which batches the running ones
together. The engine call releases the GIL; its per-token callback runs in the worker thread and hands
events to the event loop with `call_soon_threadsafe`, so the loop never waits on the model. Returning
True from the callback aborts a job, which is how a client that hangs up frees its slot.

Tenants: a job reuses a cached prompt prefix only in a slot holding its own tenant's tokens (providers/local_slots.py
picks the slot), restored there from its own tenant's saved prefixes if need be (providers/local_cache.py); a
prompt longer than a slot's tokens can stand for is refused in `check`, before any worker tokenises it
(providers/local_bound.py, from the model's vocabulary); and a tenant's prompts likely too long for a slot are
tokenised one at a time (local_slots.py `TenantLane`), so they never hold every worker.

Loading reports its steps (assembling a catalog model, loading, ready) on the `grokgate.local` logger; printing
progress is the command line's (cli.py passes its printer to `ensure_model` for `grokgate model`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import orjson

from grokgate.core.errors import GatewayError, bad_request
from grokgate.core.fairqueue import FairQueue
from grokgate.core.pricing import estimate_prompt_tokens
from grokgate.providers.base import BackendStatus, Call, ModelFacts, Token, register
from grokgate.providers.local_bound import PromptBound, message_chars
from grokgate.providers.local_cache import SavedStates, SlotFiles, TenantPromptCache, private_directory
from grokgate.providers.local_count import PromptCounting
from grokgate.providers.local_errors import ENGINE_FAILED, refused
from grokgate.providers.local_jobs import Job as _Job
from grokgate.providers.local_jobs import JobEnd as _JobEnd
from grokgate.providers.local_jobs import LocalGeneration
from grokgate.providers.local_slots import PromptDigests, Slot, SlotTable, TenantLane
from grokgate.providers.local_tokenize import engine_tokens
from grokgate.providers.local_tools import (
    PROBE_MARK,
    TEXT_ONLY_GRAMMAR,
    answer_grammar,
    answered_calls,
    check_arguments,
    check_tools,
    probe_grammar,
    render_messages,
    schema_error,
    tool_plan,
)
from grokgate.providers.model_files import DEFAULT_MODEL, CatalogModel, Progress, ensure_model
from grokgate.schemas.chat import ChatCompletionRequest

log = logging.getLogger("grokgate.local")


class LocalEngine:
    """Owns the xllamacpp server, the fair job queue and the worker threads."""

    name = "local"

    def __init__(
        self,
        *,
        model_path: Path | None,
        cache_dir: Path,
        catalog_model: CatalogModel = DEFAULT_MODEL,
        threads: int = 1,
        slots: int = 4,
        ctx_per_slot: int = 4096,
        slot_prompt_similarity: float = 0.1,
        prompt_cache_ram_mib: int = 8192,
        shared_prompt_cache: bool = False,
        verbose: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self._model_path = model_path
        self._catalog_model = catalog_model
        self._cache_dir = cache_dir
        self._threads = threads
        self._slots = slots
        self._ctx_per_slot = ctx_per_slot
        self._slot_prompt_similarity = slot_prompt_similarity
        self._prompt_cache_ram_mib = prompt_cache_ram_mib
        # A single-tenant deployment's opt-out (settings.shared_prompt_cache): any request may reuse any cached prefix.
        self._shared_prompt_cache = shared_prompt_cache
        self._verbose = verbose
        self._progress = progress  # called while a catalog model is assembled (default: a log line per 10%)
        self._server: Any = None
        self._queue: FairQueue[_Job] = FairQueue()
        self._workers: list[threading.Thread] = []
        self._busy = 0
        # Reproducible jobs (a seed, or temperature 0) run alone: llama.cpp's numbers, and so the sampled
        # text, change with what else shares the batch. The gate admits either one such job or any
        # number of ordinary ones, and a waiting exclusive job holds back new ordinary ones.
        self._gate = threading.Condition()
        self._exclusive_running = False
        self._exclusive_waiting = 0
        self._at_gate = 0
        self._tokens_generated = 0
        self._jobs_done = 0
        self._jobs_started = 0
        self._queue_wait_seconds = 0.0  # summed from a job's creation to its start: the fair queue's wait
        self._fingerprint = "local"
        self._load_error: str | None = None
        self._loading: asyncio.Task[None] | None = None
        self._socket_dir: str | None = None
        self._listener: tuple[str, str] | None = None  # the engine's HTTP listener: its socket and key
        # Tokenize calls (xAI's Tokenize service) in a thread of their own: the listener answers one at a time.
        self._tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="local-tokenize")
        self._counting = PromptCounting()  # prompts counted before admission (providers/local_count.py)
        self._grammars: dict[bytes, bool] = {}  # tools grammars: whether the engine enforces each
        self._slot_table = SlotTable(slots)  # unused with a shared prompt cache: llama.cpp picks the slot
        # Per tenant, evicted prefixes saved for their tenant (providers/local_cache.py); None when shared or off.
        self.tenant_cache: TenantPromptCache | None = None
        self._saves_dir: Path | None = None
        self._long: TenantLane[_Job] = TenantLane(self._release_long)
        # The longest prompt a slot could hold (providers/local_bound.py): exact once the vocabulary is read.
        self.prompt_bound = PromptBound.unread(ctx_per_slot)
        self.resolved_model: Path | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin loading in a thread; the server answers /healthz meanwhile and /readyz once loaded."""
        self._loading = asyncio.create_task(asyncio.to_thread(self._load), name="local-engine-load")
        self._loading.add_done_callback(self._on_loaded)

    def _on_loaded(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self._load_error = "loading was cancelled"
        elif task.exception() is not None:
            self._load_error = str(task.exception())
            log.error("local engine failed to load: %s", self._load_error)

    def _load(self) -> None:
        import xllamacpp

        started = time.monotonic()
        if self._model_path is None:
            model = self._catalog_model
            path = ensure_model(model, self._cache_dir, progress=self._progress or _progress_log(model.name))
            identity = model.sha256[:12]
        else:
            path = self._model_path.expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"model file not found: {path}")
            st = path.stat()
            identity = hashlib.sha256(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        self.resolved_model = path
        log.info("loading %s (%d slots, %d thread(s))", path.name, self._slots, self._threads)
        self.prompt_bound = PromptBound.of_model(path, self._ctx_per_slot)  # 0.25 s for Qwen 2.5's 152k tokens

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_parallel = self._slots
        params.n_ctx = self._slots * self._ctx_per_slot
        params.cpuparams.n_threads = self._threads
        params.cpuparams_batch.n_threads = self._threads
        # A conversation's next turn goes to an idle slot holding its prefix. By default grokgate names the slot
        # (providers/local_slots.py: only the tenant's own prefixes are reused, so llama.cpp's host-memory prompt
        # cache, which it fills and reads only where it picks the slot itself and which matches any tenant's
        # prompt, is off); prefixes evicted from slots are saved per tenant instead, up to the same bound
        # (providers/local_cache.py, through the listener below). With a shared prompt cache llama.cpp picks by
        # prompt similarity among idle slots, and what a slot evicts stays restorable from host memory, whoever
        # sent it. Either way grokgate's fair queue decides who runs next, and seeded and temperature-0 requests
        # skip the cache (`cache_prompt: false`).
        params.slot_prompt_similarity = self._slot_prompt_similarity
        params.cache_ram_mib = self._prompt_cache_ram_mib if self._shared_prompt_cache else 0
        params.verbosity = 3 if self._verbose else -1
        # llama.cpp's "fit to device memory" pass loads the model's metadata a second time to resize n_ctx and
        # offload (half of this load's CPU: 0.5 s of 1.0 s here). grokgate sets n_ctx itself and runs on the CPU,
        # so the pass could only change the context it was asked for.
        params.fit_params = False
        # xllamacpp always opens llama.cpp's own HTTP listener and offers no switch to turn it off. Bind it
        # to a Unix socket in a private (0700) directory and require a random key nobody knows, so nothing
        # but this process can reach it.
        self._socket_dir = tempfile.mkdtemp(prefix="grokgate-engine-")
        listener, key = str(Path(self._socket_dir) / "llama.sock"), secrets.token_urlsafe(32)
        params.hostnames = [listener]
        params.api_keys = [key]
        params.n_threads_http = 1
        self._listener = (listener, key)
        limit = self._prompt_cache_ram_mib << 20
        if not self._shared_prompt_cache and limit:
            self._saves_dir = private_directory(limit)
            params.slot_save_path = f"{self._saves_dir}/"  # llama.cpp appends the file name to it as it is
        self._server = xllamacpp.Server(params)
        if self._saves_dir is not None:
            self.tenant_cache = TenantPromptCache(self._slot_table, SavedStates(self._saves_dir, limit),
                                                  SlotFiles(listener, key))
        self._fingerprint = f"fp_local_{identity}_xllamacpp-{xllamacpp.__version__}"

        for i in range(self._slots):
            worker = threading.Thread(target=self._work, name=f"local-engine-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        log.info("model ready in %.1fs", time.monotonic() - started)

    async def close(self) -> None:
        self._queue.close()
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
        self._counting.close()
        if self._loading is not None and not self._loading.done():
            await asyncio.shield(self._loading)
        for worker in self._workers:
            await asyncio.to_thread(worker.join, 30)
        self._server = None
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        if self._saves_dir is not None:
            shutil.rmtree(self._saves_dir, ignore_errors=True)

    # -- Provider ------------------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def ready(self) -> bool:
        return self._server is not None

    def status(self) -> BackendStatus:
        return {
            "ready": self.ready(),
            "error": self._load_error,
            "model": self.resolved_model.name if self.resolved_model else None,
            "slots": self._slots,
            "slots_busy": self._busy,
            "queued": len(self._queue) + self._at_gate + len(self._long),
            "tokens_generated": self._tokens_generated,
            "jobs_done": self._jobs_done,
            "jobs_started": self._jobs_started,
            "queue_wait_seconds": round(self._queue_wait_seconds, 6),
        }

    def check(self, request: ChatCompletionRequest) -> None:
        """Refuse, in our words and naming the field, what llama.cpp would refuse with its own message (or, for
        tool-call arguments, with a 500)."""
        chars = message_chars(request)
        if (too_long := self.prompt_bound.refusal(chars)) is not None:  # first: no other work on such a prompt
            raise too_long
        if request.server_tools:  # xAI's web search, X search... run only on xAI (providers/xai.py)
            raise bad_request(f"Server-side tools ({', '.join(request.server_tools)}) run only on a route to xAI; "
                              f"the model '{request.model}' is served by the local engine here. Remove them from "
                              "`tools` or use a model routed to xAI.", "tools")
        check_tools(request)
        if request.tools:
            plan = tool_plan(request)
            # The tools are rendered into the system message (providers/local_tools.py), as JSON no shorter.
            if plan is not None and (too_long := self.prompt_bound.refusal(chars + len(orjson.dumps(plan.tools)))):
                raise too_long
        messages = request.messages
        for i, message in enumerate(messages):
            if message.has_images():
                raise GatewayError(
                    400,
                    "bad_request",
                    f"The model '{request.model}' is served by a local text model that does not accept images.",
                    param=f"messages[{i}].content",
                )
            if message.tool_calls:
                check_arguments(i, message.tool_calls)
            elif message.role == "assistant" and message.content is None:
                raise bad_request("The local engine needs an assistant message to have content or tool_calls.",
                                  f"messages[{i}].content")
        last = len(messages) - 1
        if messages[last].role == "assistant":  # llama.cpp continues it (a prefill)
            if messages[last].tool_calls:
                raise bad_request("The local engine cannot continue an assistant message that has tool_calls: "
                                  "send the tools' results after it.", f"messages[{last}].tool_calls")
            if last > 0 and messages[last - 1].role == "assistant":
                raise bad_request("The local engine continues one assistant message at the end of the "
                                  "conversation, not two.", f"messages[{last}]")
        if request.tools and request.logprobs and request.stream:
            raise bad_request("The local engine cannot return logprobs in a stream when tools are given.", "logprobs")
        if not self.ready():
            reason = f" ({self._load_error})" if self._load_error else ""
            raise GatewayError(
                503, "model_loading", f"The local model is not loaded yet{reason}. Retry shortly.",
                headers={"retry-after": "2"},
            )

    def prompt_copies(self, request: ChatCompletionRequest) -> int:
        # The choices share one prompt evaluation; llama.cpp reports (and grokgate bills) it once. An answer after
        # tool results may be generated twice (providers/local_jobs.py `answer_again`), from another prompt: both
        # count. (A continuation for parallel calls extends the same answer: its prompt is billed once.)
        return 2 if _answered(request) else 1

    async def count_prompt(self, call: Call, upstream_model: str) -> int | None:
        """Exactly the prompt this call's engine request will be billed (providers/local_count.py); None for a
        prompt too large to count cheaply, or when the listener does not answer in time."""
        if self._listener is None or not self._counting.worth(call.prompt_tokens):
            return None
        return await self._counting.count(self._listener, call.tenant, _payload(call, upstream_model))

    # -- Tokenizer, DescribesModels (providers/base.py): one model, whatever name a route gives it -------------

    async def tokenize(self, text: str, model: str) -> list[Token]:
        """The model's own tokens of `text` (providers/local_tokenize.py), in a worker thread."""
        if self._listener is None or not self.ready():
            raise GatewayError(503, "model_loading", "The local model is not loaded yet. Retry shortly.",
                               headers={"retry-after": "2"})
        socket_path, key = self._listener
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizing, engine_tokens, socket_path, key, text)

    def describe(self, model: str) -> ModelFacts:
        return ModelFacts(context_length=self._ctx_per_slot)  # a request holds one slot; text only

    def generate(self, call: Call, upstream_model: str) -> LocalGeneration:
        request = call.request
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        base = _payload(call, upstream_model)
        plan = tool_plan(request)
        answered = _answered(request)
        # The answer if the model only repeats a call the conversation answered: as with tool_choice "none".
        fallback = _payload(_Untooled(call), upstream_model) if answered else None
        prompt = PromptDigests(base["messages"])  # one per request: its choices share the prompt
        jobs = []
        for index in range(request.choices):
            payload = dict(base)
            if request.seed is not None:
                payload["seed"] = (request.seed + index) & 0xFFFFFFFF
            job = _Job(index, payload, loop, queue, exclusive=not payload["cache_prompt"], plan=plan,
                       tenant=call.tenant, prompt=prompt, answered=answered)
            if fallback is not None:
                job.fallback = {**fallback, **({"seed": payload["seed"]} if "seed" in payload else {})}
            jobs.append(job)
        # The tools are rendered into the prompt too (providers/local_tools.py): their JSON counts.
        tools_chars = len(orjson.dumps([t.model_dump(exclude_none=True) for t in request.tools or ()]))
        generation = LocalGeneration(self, jobs, queue, estimate_prompt_tokens(request.prompt_chars + tools_chars))
        if self.prompt_bound.is_long(message_chars(request) + tools_chars):
            for job in jobs:
                job.long = True
            self._long.put(call.tenant, id(generation), jobs)
        else:
            self._queue.put_group(id(generation), jobs)
        return generation

    def _release_long(self, key: Hashable, job: _Job) -> None:
        """Put a job of a long prompt into the fair queue: its tenant's last one has ended (local_slots.py)."""
        try:
            self._queue.put_group(key, [job])
        except RuntimeError:  # closed: the engine is shutting down
            job.post(_JobEnd(None))
            self._long.done(job.tenant)

    def discard(self, generation: LocalGeneration) -> None:
        for job in self._long.discard(id(generation)):
            job.post(_JobEnd(None))
        for job in self._queue.discard(id(generation)):
            job.post(_JobEnd(None))
            if job.long:
                self._long.done(job.tenant)

    # -- worker threads ----------------------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.cancelled:
                job.post(_JobEnd(None))
                if job.long:
                    self._long.done(job.tenant)
                continue
            self._enter(job.exclusive)
            try:
                if not job.cancelled:
                    job.started = True
                    with self._gate:
                        self._jobs_started += 1
                        self._queue_wait_seconds += time.monotonic() - job.created
                    self._run(job)
            except ValueError as exc:  # xllamacpp raises ValueError for requests it cannot parse
                job.post(refused(str(exc), job.payload))
            except Exception:
                log.exception("local engine job failed")
                job.post(GatewayError(500, "api_error", ENGINE_FAILED))
            finally:
                self._leave(job)
                job.post(_JobEnd(job.usage))
                if job.long:
                    self._long.done(job.tenant)

    def _run(self, job: _Job) -> None:
        """Run `job` in the engine: in a slot of grokgate's choice (providers/local_slots.py), reusing what the
        slot holds only if it holds the job's own tenant's tokens; with a shared prompt cache, where llama.cpp
        picks."""
        if self._shared_prompt_cache:
            if job.parser is not None and not self._grammar_ok(job.payload["grammar"], job.tenant):
                job.post(self._schema_error(job))
            else:
                self._server.handle_chat_completions(job.payload, job.on_chunk)
                while (again := job.answer_again()) is not None:
                    self._server.handle_chat_completions(again, job.on_chunk)
                job.end()
            return
        messages = job.prompt.get()
        reuse, cache = bool(job.payload["cache_prompt"]), self.tenant_cache
        saved, shared = cache.lookup(job.tenant, messages) if cache is not None and reuse else (None, 0)
        slot, own = self._slot_table.take(job.tenant, messages, saved=shared)
        touched = False  # whether the job's prompt may have reached the slot's KV cache
        try:
            if cache is not None:  # before anything of the job's reaches the slot
                cache.keep(slot, job.tenant, messages)
            # (The grammar probe runs in the slot, but its one-token prompt is nobody's.)
            if job.parser is not None and not self._grammar_ok(job.payload["grammar"], job.tenant, slot):
                job.post(self._schema_error(job, slot))
                return
            own = cache.fill(slot, job.tenant, messages, saved) if cache is not None else slot.tenant == job.tenant
            payload = {**job.payload, "id_slot": slot.id, "cache_prompt": reuse and own}
            touched = True
            try:
                self._server.handle_chat_completions(payload, job.on_chunk)
                while (again := job.answer_again()) is not None:
                    # The same tenant's slot, another prompt: the slot table's note of its content only guides
                    # reuse (llama.cpp compares the tokens themselves), and nobody else's tokens are in it.
                    self._server.handle_chat_completions({**again, "id_slot": slot.id, "cache_prompt": reuse},
                                                         job.on_chunk)
                job.end()
            except ValueError:  # xllamacpp could not parse it: it never reached a slot
                touched = False
                raise
        finally:
            self._slot_table.give_back(slot, job.tenant, messages, evaluated=job.evaluated,
                                       touched=touched and not job.refused)

    def _schema_error(self, job: _Job, slot: Slot | None = None) -> GatewayError:
        """The refusal of a tools grammar the engine cannot enforce, naming whose schema it is."""
        alone = answer_grammar(job.plan) if job.plan is not None else None
        return schema_error(alone is not None and not self._grammar_ok(alone, job.tenant, slot))

    def _grammar_ok(self, grammar: str, tenant: str = "", slot: Slot | None = None) -> bool:
        """Whether the engine enforces this tools grammar (providers/local_tools.py probe_grammar); remembered per
        tenant unless the prompt cache is shared (a probe skipped because another tenant sent the same tools
        first would show in the time to the first token). The probe runs in the job's own slot when grokgate
        picks slots, so it never lands in another worker's."""
        scope = "" if self._shared_prompt_cache else tenant
        # Not the text: a client's schemas can be megabytes.
        key = hashlib.sha256(scope.encode() + b"\0" + grammar.encode()).digest()
        known = self._grammars.get(key)
        if known is None:
            probe: dict[str, Any] = {"prompt": "x", "grammar": probe_grammar(grammar), "max_tokens": 1,
                                     "temperature": 0, "cache_prompt": False}
            if slot is not None:
                probe["id_slot"] = slot.id
            choices = self._server.handle_completions(probe).get("choices") or [{}]
            if slot is not None:  # its prompt replaced what the slot held
                self._slot_table.hold(slot, None, ())
            known = str(choices[0].get("text", "")).startswith(PROBE_MARK[0])
            if len(self._grammars) > 256:
                self._grammars.clear()
            self._grammars[key] = known
        return known

    def _enter(self, exclusive: bool) -> None:
        with self._gate:
            self._at_gate += 1
            if exclusive:
                self._exclusive_waiting += 1
                while self._busy or self._exclusive_running:
                    self._gate.wait()
                self._exclusive_waiting -= 1
                self._exclusive_running = True
            else:
                while self._exclusive_running or self._exclusive_waiting:
                    self._gate.wait()
            self._at_gate -= 1
            self._busy += 1

    def _leave(self, job: _Job) -> None:
        with self._gate:
            self._busy -= 1
            if job.exclusive:
                self._exclusive_running = False
            self._tokens_generated += job.generated
            self._jobs_done += 1
            self._gate.notify_all()


class _Untooled:
    """A call as if it said tool_choice "none": the answer generated after a repeated call."""

    def __init__(self, call: Call) -> None:
        self.request = call.request.model_copy(update={"tool_choice": "none"})
        self.output_limit = call.output_limit


def _answered(request: ChatCompletionRequest) -> frozenset[str]:
    if request.messages[-1].role != "tool":  # only a conversation ending in tool results (answered_calls)
        return frozenset()
    plan = tool_plan(request)
    if plan is None or plan.forced:
        return frozenset()
    return answered_calls([m.model_dump(exclude_none=True) for m in request.messages])


_PASSTHROUGH = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs")


def _payload(call: Call | _Untooled, upstream_model: str) -> dict[str, Any]:
    """The engine request for one choice (n=1), from the validated public request."""
    request = call.request
    messages = []
    for message in request.messages:
        item = message.model_dump(exclude_none=True, by_alias=True)
        if item["role"] == "developer":
            item["role"] = "system"
        messages.append(item)
    plan = tool_plan(request)
    payload: dict[str, Any] = {
        "model": upstream_model,
        "messages": render_messages(messages, plan),
        "stream": True,
        "stream_options": {"include_usage": True},
        # Running counts on every chunk: a job aborted before its usage report is billed what it counted.
        "timings_per_token": True,
        "n": 1,
    }
    for name in _PASSTHROUGH:
        value = getattr(request, name)
        if value is not None:
            payload[name] = value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value
    if call.output_limit is not None:
        payload["max_tokens"] = call.output_limit
    if request.stop_list:
        payload["stop"] = request.stop_list  # never with a tool plan: check_tools refuses the pair
    if plan is not None:  # `tools` are not sent: grokgate renders them and constrains the calls itself
        payload["grammar"] = plan.grammar()  # with the structured answer's schema, if any
    elif request.tools and (request.response_format is None or request.response_format.type == "text"):
        # tool_choice none: no call may happen, and none may be written out as text either.
        payload["grammar"] = TEXT_ONLY_GRAMMAR
    elif request.response_format is not None:
        payload["response_format"] = request.response_format.model_dump(exclude_none=True, by_alias=True)
    # The prompt cache reuses KV state across requests, which changes the numbers and so the text:
    # a request that asks for reproducible output gets a fresh evaluation.
    payload["cache_prompt"] = request.seed is None and request.temperature != 0
    return payload


def _progress_log(name: str) -> Progress:
    """Assembly progress as a log line per 10% (the server's default; `grokgate model` prints its own)."""
    last = [-1]

    def report(done: int, total: int) -> None:
        pct = done * 100 // max(total, 1)
        if pct // 10 != last[0] // 10 or done == total:
            last[0] = pct
            log.info("assembling %s: %d%% (%d / %d MiB)", name, pct, done >> 20, total >> 20)

    return report


@register("local")
def create_local(**config: Any) -> LocalEngine:
    return LocalEngine(**config)
