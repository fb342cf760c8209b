"""Deferred completions (xAI's `deferred: true`, and gRPC's StartDeferredCompletion / GetDeferredCompletion): a
request is admitted at once and answered with a fresh id; its generation runs in the background through the same
lifecycle as any collected request (serving/lifecycle.py: settlement exactly once, metrics, the log line, the
ledger's endpoint of its wire format); its owner polls the id until the answer is there.

Wire-neutral: `start` takes the `Call`, `Principal` and `WireFormat` a transport built, and what is kept is the
collected payload of that wire format (the chat-completion object for chat, whichever transport converts it), or
the `GatewayError` the generation failed with. `get` answers PENDING, DONE (the payload) or FAILED (the error);
an id that is unknown, another tenant's or expired is a 404 `not_found`, the same for all three.

Where things live:
- Admission happens in `start`: a refused request (used_up, rate limits, an unknown model) is refused there with
  its own status, never deferred. Beyond `max_pending` requests of one tenant pending in this process, `start`
  answers 429.
- Results live in the Responses store (core/responses.py: the accounts database's `responses` table, so every
  replica reads them; with accounts off, this process's bounded memory): two rows per request, owned by the
  tenant's deferred scope (`deferred_owner` of `tenant_of`, the Responses store's owner key: the Responses API
  and stored chat completions never find them; a deleted token's go with its responses), under ids no Responses
  request has (`_row_ids`):
  a small pending row written once admitted, visible until the request's deadline, and the result row, written
  when it ends and kept `retention_ms` (xAI keeps 24 h), counted in the store's size bound (a result larger than
  `max_result_bytes` is kept as a failure saying so). `get` reads the pending row before the result row, and
  the result row is written before the pending row is removed, so a poller on any replica never sees a request
  vanish between the two.
- A request runs at most `timeout_s`: then its generation is stopped (billed what it consumed, as a client that
  went away) and it fails with 504. The pending row expires a minute after that deadline, so the requests of a
  replica that died outright (SIGKILL: its reservations are reclaimed by the next start, store/sql.py) end as 404
  instead of pending forever.
- `close` (app.py's shutdown, before the backends and the store close) stops what is pending the same way and
  keeps a 503 failure for each: every admitted request is settled once, billed what it consumed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from grokgate.core.accounts import now_ms
from grokgate.core.admission import Principal
from grokgate.core.errors import GatewayError
from grokgate.core.responses import ResponseStore, StoredResponse, deferred_owner
from grokgate.core.tenancy import tenant_of
from grokgate.providers.base import Call
from grokgate.serving.lifecycle import INTERNAL_ERROR, Collected, Serving
from grokgate.serving.wire import Payload, WireFormat

log = logging.getLogger("grokgate.deferred")

Status = Literal["pending", "done", "failed"]
PENDING: Final = "pending"
DONE: Final = "done"
FAILED: Final = "failed"
OBJECT: Final = "grokgate.deferred_completion"  # what the store's rows say they are
PENDING_MARGIN_MS: Final = 60_000  # a pending row outlives its request's deadline by this much
MAX_ID: Final = 64  # longer ids are not looked up (ours are 36 characters)


@dataclass(frozen=True, slots=True)
class DeferredResult:
    """What `get` found: still pending; done, with the payload its wire format collected; or failed, with the
    error the request would have answered had it not been deferred."""

    status: Status
    body: Payload | None = None
    error: GatewayError | None = None


class _Pending:
    """One request running in this process."""

    __slots__ = ("gone", "owner", "reason", "task")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.gone = asyncio.Event()  # set to stop the generation: shutdown or the deadline
        self.reason: GatewayError | None = None  # why it was stopped
        self.task: asyncio.Task[None] | None = None


def not_found(request_id: str) -> GatewayError:
    return GatewayError(404, "not_found", f"No deferred completion with id '{request_id}' was found: it is "
                        "unknown, another token's, or has expired.", param="request_id")


def _row_ids(request_id: str) -> tuple[str, str]:
    """The pending row's id and the result row's: never the id of a stored response (`resp_...`)."""
    return f"deferred-pending:{request_id}", f"deferred:{request_id}"


def _error_json(error: GatewayError) -> dict[str, Any]:
    return {"status": error.status, "code": error.code, "message": error.message, "param": error.param}


def _error_of(data: Any) -> GatewayError:
    if not isinstance(data, dict):
        return _internal()
    return GatewayError(int(data.get("status", 500)), str(data.get("code", "api_error")),
                        str(data.get("message", "Internal server error.")), param=data.get("param"))


class Deferred:
    """The deferred requests of one app (app.py builds it once; the Gateway holds it)."""

    def __init__(self, serving: Serving, store: ResponseStore, *, retention_ms: int, max_pending: int,
                 timeout_s: float, max_result_bytes: int, clock: Callable[[], int] = now_ms) -> None:
        self.serving = serving
        self.store = store
        self.retention_ms = retention_ms
        self.max_pending = max_pending  # per tenant, in this process
        self.timeout_s = timeout_s
        self.max_result_bytes = max_result_bytes
        self.clock = clock  # epoch milliseconds: what has expired is not found
        self._running: dict[str, _Pending] = {}
        self._per_owner: Counter[str] = Counter()
        self._closing = False

    # -- starting ----------------------------------------------------------------------------------------------

    async def start(self, call: Call, principal: Principal, wire: WireFormat) -> str:
        """Admit the request and start its generation in the background; its id, once admitted. Raises the
        refusal as a GatewayError (the same as `Serving.serve` would), or 429 past this tenant's pending cap, or
        503 while the server shuts down. The call must be a collected one (not a stream)."""
        if call.request.stream:
            raise GatewayError(400, "bad_request", "A deferred request cannot be streamed: `deferred` and `stream` "
                               "exclude each other.", param="deferred")
        if self._closing:
            raise GatewayError(503, "service_unavailable", "The server is shutting down; send the request again.")
        owner = deferred_owner(tenant_of(principal))
        if self._per_owner[owner] >= self.max_pending:
            raise GatewayError(429, "too_many_requests", f"Too many deferred requests running: at most "
                               f"{self.max_pending} at a time on one server; send more once one has finished.",
                               param="deferred")
        request_id = str(uuid.uuid4())  # random (os.urandom): unguessable, and xAI's ids are UUIDs too
        entry = _Pending(owner)
        # Counted before the first await, so concurrent starts cannot pass the cap together.
        self._running[request_id] = entry
        self._per_owner[owner] += 1
        admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._run(request_id, entry, call, principal, wire, admitted),
                                   name=f"deferred-{request_id}")
        entry.task = task
        # Forgotten when the task ends (after its result row is written), also a task cancelled before it ran.
        task.add_done_callback(lambda _: self._forget(request_id, entry))
        try:
            await asyncio.shield(admitted)
            await self._save_pending(request_id, entry)
        except asyncio.CancelledError:
            # The caller went away before it had the id: nobody will fetch the answer, so the generation stops as
            # a disconnect (billed what it used). Not cancelled: a cancel in the middle of admission would leave a
            # reservation being written with nobody to settle it.
            admitted.add_done_callback(_retrieve)
            self._stop(entry, GatewayError(499, "client_disconnected", "The client went away before it had the "
                                           "deferred request's id."))
            raise
        log.info("deferred request started", extra={"request_id": call.request_id, "deferred_id": request_id})
        return request_id

    async def _run(self, request_id: str, entry: _Pending, call: Call, principal: Principal, wire: WireFormat,
                   admitted: asyncio.Future[None]) -> None:
        def on_admitted() -> None:
            if not admitted.done():  # must not raise: serve calls it between admission and settlement's care
                admitted.set_result(None)

        async def until_stopped() -> None:
            await entry.gone.wait()

        deadline = asyncio.get_running_loop().call_later(self.timeout_s, self._stop, entry, GatewayError(
            504, "timeout", f"The deferred request did not finish within {self.timeout_s:g} seconds."))
        body: Payload | None = None
        failure: GatewayError | None = None
        try:
            try:
                result = await self.serving.serve(call, principal, wire, until_stopped, admitted=on_admitted)
            except GatewayError as exc:
                failure = exc
            except asyncio.CancelledError:
                # Cancelled (the shutdown's last resort, or `start`'s caller gone): the lifecycle has settled it;
                # what is left is keeping its failure, so the cancellation stops here.
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
                failure = entry.reason or _shutdown()
            except Exception:
                log.exception("deferred request failed", extra={"request_id": call.request_id})
                failure = _internal()
            else:
                if isinstance(result, Collected):
                    body = result.body
                else:  # stopped (ABANDONED): by the deadline or the shutdown
                    failure = entry.reason or _shutdown()
            if not admitted.done():  # refused before admission: `start` raises it, nothing is kept
                admitted.set_exception(failure or _internal())
                return
            await asyncio.shield(self._save_result(request_id, entry.owner, body, failure))
        finally:
            deadline.cancel()

    def _forget(self, request_id: str, entry: _Pending) -> None:
        if self._running.pop(request_id, None) is None:
            return
        self._per_owner[entry.owner] -= 1
        if self._per_owner[entry.owner] <= 0:
            del self._per_owner[entry.owner]

    def _stop(self, entry: _Pending, reason: GatewayError) -> None:
        """End a pending request's generation as if its client had gone: it is settled with what it consumed."""
        if entry.reason is None:
            entry.reason = reason
        entry.gone.set()

    # -- the store ---------------------------------------------------------------------------------------------

    def _row(self, row_id: str, owner: str, expires_at: int, data: dict[str, Any]) -> StoredResponse:
        return StoredResponse(id=row_id, owner=owner, created_at=self.clock(), expires_at=expires_at,
                              previous_id=None, input_items=[], response={"object": OBJECT, **data})

    async def _save_pending(self, request_id: str, entry: _Pending) -> None:
        expires = self.clock() + int(self.timeout_s * 1000) + PENDING_MARGIN_MS
        pending_id = _row_ids(request_id)[0]
        try:
            await self.store.save(self._row(pending_id, entry.owner, expires, {"status": PENDING}))
            if entry.task is not None and entry.task.done():
                # The request ended (its result kept, the pending row "deleted") before this row was written: it
                # must not outlive the result and answer pending again.
                await self.store.delete(entry.owner, pending_id)
        except Exception:  # this process still answers pending; other replicas answer 404 until the result
            log.exception("keeping a deferred request's pending row failed", extra={"deferred_id": request_id})

    async def _save_result(self, request_id: str, owner: str, body: Payload | None,
                           failure: GatewayError | None) -> None:
        pending_id, result_id = _row_ids(request_id)
        expires = self.clock() + self.retention_ms
        data: dict[str, Any] = ({"status": FAILED, "error": _error_json(failure)} if failure is not None
                                else {"status": DONE, "body": body})
        try:
            kept = await self.store.save(self._row(result_id, owner, expires, data), max_bytes=self.max_result_bytes)
            if kept is None:  # the answer is larger than a result may be: say so rather than vanish
                too_large = GatewayError(507, "result_too_large", "The deferred completion was larger than the "
                                         f"{self.max_result_bytes} bytes grokgate keeps of one; ask for fewer "
                                         "tokens or send the request without `deferred`.")
                await self.store.save(self._row(result_id, owner, expires,
                                                {"status": FAILED, "error": _error_json(too_large)}))
            await self.store.delete(owner, pending_id)
        except Exception:  # the request is settled; only its answer is lost (logged), polls end in 404
            log.exception("keeping a deferred result failed", extra={"deferred_id": request_id})

    # -- fetching ----------------------------------------------------------------------------------------------

    async def get(self, principal: Principal, request_id: str) -> DeferredResult:
        """The request's state for its owner; 404 `not_found` (raised) when unknown, another tenant's, expired."""
        owner = deferred_owner(tenant_of(principal))
        entry = self._running.get(request_id)
        if entry is not None and entry.owner == owner:
            return DeferredResult(PENDING)
        if not 0 < len(request_id) <= MAX_ID:
            raise not_found(request_id)
        pending_id, result_id = _row_ids(request_id)
        # The pending row first: the result row is written before the pending row is removed (`_save_result`).
        pending = await self.store.get(owner, pending_id)
        result = await self.store.get(owner, result_id)
        now = self.clock()
        if result is not None and result.expires_at > now:
            data = result.response
            body = data.get("body")
            if data.get("status") == DONE and isinstance(body, dict):
                return DeferredResult(DONE, body=dict(body))
            return DeferredResult(FAILED, error=_error_of(data.get("error")))
        if pending is not None and pending.expires_at > now:
            return DeferredResult(PENDING)
        raise not_found(request_id)

    def pending(self, owner: str | None = None) -> int:
        """Requests running in this process (of one owner, if named)."""
        return self._per_owner[owner] if owner is not None else len(self._running)

    # -- shutdown ----------------------------------------------------------------------------------------------

    async def close(self, grace_s: float) -> None:
        """Stop every pending request (each settled once, billed what it consumed, and kept as a 503 failure),
        waiting at most `grace_s` for them to end as a client that went away does; then cancel what is left
        (settled as errors by the lifecycle). New starts are refused with 503 from now on."""
        self._closing = True
        entries = list(self._running.values())
        for entry in entries:
            self._stop(entry, _shutdown())
        tasks = [e.task for e in entries if e.task is not None]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=grace_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)


def _internal() -> GatewayError:
    return GatewayError(INTERNAL_ERROR.status, INTERNAL_ERROR.code, INTERNAL_ERROR.message)


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a refusal nobody awaits any more as seen (asyncio would log it as never retrieved)."""
    if not future.cancelled():
        future.exception()


def _shutdown() -> GatewayError:
    return GatewayError(503, "service_unavailable", "The server shut down before the deferred request finished; "
                        "what it generated was billed. Send it again.")
