"""Admission: the one choke point every inference request passes before it reaches a backend.

`authenticate` turns the Authorization header into a principal; `admit` decides whether this request may
run (limits, and later a credit reservation) and returns a ticket that is settled exactly once, on every
ending. The accounts issue replaces `StaticKeyAdmission` with a store-backed implementation; the routes do
not change.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from grokgate.core.errors import GatewayError
from grokgate.core.events import Origin, Usage
from grokgate.core.limits import Limits


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an id safe to log (never the token itself), and what it may do."""

    key_id: str
    prefix: str | None = None  # the token's display prefix (gg-xxxxxxxx), safe to log
    token_id: int | None = None
    admin: bool = False
    allowed_models: tuple[str, ...] | None = None
    limits: Limits | None = None
    # The token's balance (micro-credits) when its record was read: admission caches records for a couple of
    # seconds (store/sql.py), so this is a hint for refusing a large body before parsing it (`Gate.servable`),
    # never what a reservation is checked against. None: no account (admin and static keys).
    balance: int | None = None
    # The account the key spends from: the tenant (core/tenancy.py). Its own limits apply to all its keys together.
    account_id: int | None = None
    account_limits: Limits | None = None
    limit_period: str | None = None  # the key's spending limit's reset period (core/budgets.py)


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    request_id: str
    model: str
    choices: int
    output_limit: int | None  # the caller's per-choice output cap, if any
    prompt_tokens: int  # an upper bound of the prompt's tokens (core.pricing.prompt_token_bound)
    endpoint: str = "chat"  # the API the charge comes from: chat | responses (serving/wire.py WireFormat.endpoint)
    # The most server-side tool calls (xAI's web search, X search, code execution) the request may run: each is
    # priced per call (core/pricing.py), so admission reserves this many of them. 0: it runs none.
    server_tool_calls: int = 0


class Ticket(Protocol):
    headers: dict[str, str]  # e.g. rate-limit headers for the response
    # The per-choice output the admission paid for; the request must ask its backend for no more (None: no bound).
    output_limit: int | None
    # Set by `settle`: the micro-credits charged, and whether that exceeded the reservation (a bound that failed).
    cost: int
    overrun: bool

    async def settle(self, usage: Usage | None, *, status: str, estimated: bool = False, backend: str = "",
                     origin: Origin = "live") -> None:
        """Record the outcome (status: ok | client_disconnected | error); idempotent; called shielded, once per
        request, by the serving layer (serving/lifecycle.py)."""


class Admission(Protocol):
    async def authenticate(self, authorization: str | None) -> Principal: ...

    async def admit(self, principal: Principal, request: AdmissionRequest) -> Ticket: ...


@runtime_checkable
class Gate(Protocol):
    """What an admission that limits callers does before and besides `admit`: refused requests count against a
    token's limits, and a body is parsed at length only for a caller that can be served (api/body.py). An
    admission without it (static keys: no limits, no balances) lets everything through (`OPEN`)."""

    def precheck(self, principal: Principal) -> None:
        """Before the body is read, with no I/O: raise 429 if this process knows the caller to be past its rpm
        (a refusal or a check found its bucket full, and it cannot have drained since)."""

    async def servable(self, principal: Principal) -> None:
        """Before a large body is parsed: raise 429 when the caller is past its rpm (a read-only check of its
        bucket), 403 `used_up` when its balance is not above zero."""

    async def refused(self, principal: Principal, request_id: str, error: GatewayError) -> GatewayError:
        """The caller's request was refused with `error` after authentication: count it against the caller's
        rpm unless admission counted it already, and return what to answer (`error`, or 429 when the caller is
        past its rpm)."""
        ...


class OpenGate:
    """The gate of an admission that limits nothing."""

    def precheck(self, principal: Principal) -> None:
        return None

    async def servable(self, principal: Principal) -> None:
        return None

    async def refused(self, principal: Principal, request_id: str, error: GatewayError) -> GatewayError:
        return error


OPEN = OpenGate()


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, or AceData's auth errors."""
    if authorization is None or not authorization.strip():
        raise GatewayError(400, "no_token", "The Authorization header is missing: send 'Bearer <token>'.")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise GatewayError(401, "invalid_token", "The specified token is invalid or wrong.")
    return token


def static_key_id(token: str) -> str:
    """A static (settings) token's id in logs, limits and scopes: a short digest of it, never the token."""
    return f"key-{hashlib.sha256(token.encode()).hexdigest()[:12]}"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class _NoopTicket:
    headers: dict[str, str] = {}  # noqa: RUF012  (never mutated)
    output_limit: int | None = None  # nothing is paid for, so nothing is bounded
    cost = 0
    overrun = False

    async def settle(self, usage: Usage | None, *, status: str, estimated: bool = False, backend: str = "",
                     origin: Origin = "live") -> None:
        return None


class StaticKeyAdmission:
    """Tokens from settings, compared in constant time by their sha256 digests; no limits, no billing."""

    def __init__(self, tokens: list[str]) -> None:
        # The id names the key by a digest of it, not by its place in the list: stored responses and cached
        # answers are scoped by it, and must not pass to another key that takes the same place (after an edit
        # of GROKGATE_API_KEYS, or on another replica sharing Redis). 48 bits of a sha256: safe to log.
        self._digests = [(_digest(t), static_key_id(t)) for t in tokens]

    async def authenticate(self, authorization: str | None) -> Principal:
        presented = _digest(bearer_token(authorization))
        match: str | None = None
        for digest, key_id in self._digests:
            # Compare against every key so the time taken does not reveal which one matched.
            if hmac.compare_digest(presented, digest) and match is None:
                match = key_id
        if match is None:
            raise GatewayError(401, "invalid_token", "The specified token is invalid or wrong.")
        return Principal(key_id=match, admin=True)

    async def admit(self, principal: Principal, request: AdmissionRequest) -> Ticket:
        return _NoopTicket()
