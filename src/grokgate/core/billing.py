"""Account-backed admission: authenticate, limit, reserve; then settle exactly once on every ending.

The one choke point every inference request passes (docs/architecture.md, "Accounts"): admission reserves the
most a request can cost in one atomic store operation before anything runs, and the ticket settles the real cost
and releases the rest however the request ends (the serving layer calls `settle` once, shielded:
serving/lifecycle.py).
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from grokgate.core.accounts import (
    AccountStore,
    Settlement,
    StoreUnavailable,
    TokenRecord,
    format_credits,
    hash_token,
    now_ms,
)
from grokgate.core.admission import AdmissionRequest, Principal, bearer_token
from grokgate.core.budgets import Hold, Reserved, period_bounds
from grokgate.core.errors import GatewayError
from grokgate.core.events import Origin, Usage
from grokgate.core.limits import WINDOW_MS, Decision, Limits, RateLimiter, decide, drain, requests_only
from grokgate.core.pricing import HitPrice, Price, cache_hit_cost, cost_of, max_cost

log = logging.getLogger("grokgate.billing")

# Request ids the limiter counted (admitted, or refused for credits after `acquire`) whose error may still reach
# `AccountAdmission.refused`, which must not count them twice: kept only for failures, the oldest dropped first.
_COUNTED_MAX = 4096


def _any_limit(limits: Limits) -> bool:
    return limits.rpm is not None or limits.tpm is not None or limits.concurrency is not None

# Keys this process found past their rpm, at most; past it the notes are dropped (they are only a shortcut).
_HELD_BACK_MAX = 10_000

USED_UP = (
    "Your balance is not sufficient for current request, please buy more in Ace Data Cloud "
    "https://platform.acedata.cloud"
)


@dataclass(frozen=True, slots=True)
class BillingPolicy:
    # Output bound used for the reservation when the request sets no max_tokens.
    default_output_reservation: int = 4096
    # Micro-credits per server-side tool call (settings.server_tool_call_price); a request that may run them
    # reserves `AdmissionRequest.server_tool_calls` of them.
    server_tool_call_price: int = 0
    # Replayed answers (origin "replay") cost their recorded usage times this: 1, or 0 for free replays.
    replay_price_factor: int = 1
    # How an answer replayed from the exact response cache (origin "cache") is priced:
    # core/pricing.py cache_hit_cost (settings.response_cache_hit_price).
    cache_hit_price: HitPrice = "cached_input"

    def __post_init__(self) -> None:
        price = self.server_tool_call_price
        if not isinstance(price, int) or isinstance(price, bool) or price < 0:
            raise ValueError(f"server_tool_call_price must be a non-negative integer, got {price!r}")


class AccountTicket:
    def __init__(self, admission: AccountAdmission, principal: Principal, request: AdmissionRequest,
                 price: Price, reserved: int, limits: Limits | None, estimated_tokens: int,
                 headers: dict[str, str], output_limit: int, period_start: int = 0,
                 limit_period: str | None = None) -> None:
        self._admission = admission
        self.principal = principal
        self.request = request
        self.price = price
        self.reserved = reserved
        self.limits = limits
        self.estimated_tokens = estimated_tokens
        self.headers = headers
        self.output_limit: int | None = output_limit
        self.period_start = period_start  # the key's period this request counts in (core/budgets.py)
        self.limit_period = limit_period  # the reset period whose calendar period_start is of
        self.started = time.monotonic()
        self.settled = False
        self.cost = 0
        self.overrun = False  # the cost exceeded the reservation: a bound that did not hold

    async def settle(self, usage: Usage | None, *, status: str, estimated: bool = False,
                     backend: str = "", origin: Origin = "live") -> None:
        if self.settled:
            return
        self.settled = True
        if status == "error" and self.limits is not None:
            # The limiter counted this request; its error may now reach the api layer's refusal path.
            self._admission.counted(self.request.request_id)
        usage = usage or Usage()
        if origin != "live" and usage.cost_in_usd_ticks is not None:
            # A cached or replayed answer cost the upstream nothing now: its recorded cost is not this request's.
            usage = dataclasses.replace(usage, cost_in_usd_ticks=None)
        # Bill what was consumed for answers the client got, whole or in part; bill nothing for a failure
        # that delivered nothing (docs/architecture.md, "Accounts").
        billable = status != "error" or usage.completion_tokens > 0
        tool_call_price = self._admission.policy.server_tool_call_price
        if not billable:
            cost = 0
        elif origin == "cache":  # a hit of the exact response cache (serving/response_cache.py)
            cost = cache_hit_cost(usage, self.price, self._admission.policy.cache_hit_price,
                                  tool_call_price=tool_call_price).total
        else:
            cost = cost_of(usage, self.price, tool_call_price=tool_call_price).total
        if origin == "replay":  # a recorded answer (providers/recording.py): 0 makes replays free
            cost *= self._admission.policy.replay_price_factor
        self.cost = cost
        if cost > self.reserved and self.principal.token_id is not None:
            # The reservation is an upper bound of what a request can cost, so this means the bound failed (an
            # upstream counting more than it could have); the store then charges what the balance still
            # holds, capped. Never silent: an error line here, and a metric from the caller (serving/lifecycle.py).
            self.overrun = True
            log.error("settlement cost exceeds the reservation", extra={
                "request_id": self.request.request_id, "token": self.principal.prefix or self.principal.key_id,
                "model": self.request.model, "backend": backend, "cost": cost, "reserved": self.reserved,
                "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "server_tool_calls": usage.server_tool_calls, "estimated": estimated})
        settlement = Settlement(
            request_id=self.request.request_id, token_id=self.principal.token_id, model=self.request.model,
            backend=backend, usage=usage, cost=cost, price_version=self.price.version, status=status,
            estimated=estimated, duration_ms=int((time.monotonic() - self.started) * 1000), reserved=self.reserved,
            endpoint=self.request.endpoint, account_id=self.principal.account_id, period_start=self.period_start,
            limit_period=self.limit_period,
        )
        try:
            await self._admission.store.settle(settlement)
        finally:
            if self.limits is not None:
                await self._admission.release(self.principal, self.request.request_id, self.limits,
                                              self.estimated_tokens, usage.total_tokens)


class AccountAdmission:
    def __init__(self, store: AccountStore, limiter: RateLimiter, admin_tokens: list[str],
                 policy: BillingPolicy | None = None, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], int] = now_ms) -> None:
        self.store = store
        self._clock = clock  # seconds, for `precheck`'s notes
        self._wall = wall  # epoch ms: which period of a key's spending limit a request is admitted in
        self.limiter = limiter
        self.policy = policy or BillingPolicy()
        self._admin_hashes = [hash_token(t) for t in admin_tokens]
        self._counted: dict[str, None] = {}  # insertion-ordered: the oldest first
        # Key id -> (its limits, its requests level, when, in ms of `clock`) as a refusal or a check found
        # them past their rpm: `precheck` drains that level as the bucket would. Other processes only add to a
        # bucket shared in Redis and rpm is never given back, so this never refuses what the bucket would admit.
        self._held_back: dict[str, tuple[Limits, int, int]] = {}

    def is_admin(self, token_hash: str) -> bool:
        found = False
        for candidate in self._admin_hashes:
            found |= hmac.compare_digest(token_hash, candidate)
        return found

    async def authenticate(self, authorization: str | None) -> Principal:
        token_hash = hash_token(bearer_token(authorization))
        if self.is_admin(token_hash):
            # Each admin token its own id (stored responses and cached answers are scoped by it).
            return Principal(key_id=f"admin-{token_hash[:12]}", admin=True)
        record = await self.store.find_token(token_hash)
        if record is None:
            raise GatewayError(401, "invalid_token", "The specified token is invalid or wrong.")
        if record.disabled:
            raise GatewayError(403, "disabled", "This token has been disabled.")
        if record.account_disabled:
            raise GatewayError(403, "disabled", "This token's account has been disabled.")
        if record.expires_at is not None and record.expires_at <= now_ms():
            raise GatewayError(401, "token_expired", "This token has expired.")
        return principal_of(record)

    async def admit(self, principal: Principal, request: AdmissionRequest) -> AccountTicket:
        if principal.allowed_models is not None and request.model not in principal.allowed_models:
            allowed = ", ".join(principal.allowed_models) or "none"
            raise GatewayError(403, "model_not_allowed",
                               f"This token may not use the model '{request.model}' (allowed: {allowed}).",
                               param="model")
        price = await self.store.current_price(request.model)
        if price is None:
            raise GatewayError(500, "api_error", f"No price is configured for the model '{request.model}'.")
        # One bound for both the token-rate limit and the money: the prompt's upper bound, every choice at its
        # output bound (the caller's cap, else the policy's default, which the request is then held to).
        prompt = request.prompt_tokens
        output = request.output_limit or self.policy.default_output_reservation
        estimated_tokens = prompt + request.choices * output
        if principal.admin or principal.token_id is None:
            return AccountTicket(self, principal, request, price, 0, None, estimated_tokens, {}, output)

        limits = principal.limits or Limits()
        decision = await self._acquire(principal, request.request_id, limits, estimated_tokens)
        amount = max_cost(prompt, request.choices, output, price, server_tool_calls=request.server_tool_calls,
                          tool_call_price=self.policy.server_tool_call_price)
        period_start, resets = period_bounds(principal.limit_period, self._wall())
        assert principal.account_id is not None
        hold = Hold(principal.account_id, principal.token_id, request.request_id, amount, period_start,
                    principal.limit_period)
        try:
            outcome = await self.store.reserve(hold)
        except StoreUnavailable:
            await self.release(principal, request.request_id, limits, estimated_tokens, 0)
            self.counted(request.request_id)
            raise GatewayError(503, "accounts_unavailable", "The accounts database cannot be reached right now; "
                               "nothing was charged. Retry in a moment.", headers={"retry-after": "1"}) from None
        except BaseException:
            await self.release(principal, request.request_id, limits, estimated_tokens, 0)
            raise
        if not outcome.granted:
            await self.release(principal, request.request_id, limits, estimated_tokens, 0)
            self.counted(request.request_id)
            raise _short(outcome, request, prompt, output, price, amount, self.policy, resets)
        return AccountTicket(self, principal, request, price, amount, limits, estimated_tokens, decision.headers,
                             output, period_start, principal.limit_period)

    async def _acquire(self, principal: Principal, request_id: str, limits: Limits, tokens: int) -> Decision:
        """The key's limits, then its account's (all its keys together): both must admit the request. A key with
        no limit set is not asked about (with Redis, a round trip per request that could only say yes)."""
        decision = Decision(True, None, 0.0, {})  # what the limiter decides for a key with no limit set
        if _any_limit(limits):
            decision = await self.limiter.acquire(principal.key_id, request_id, limits, tokens)
            if not decision.allowed:
                raise _limited(decision, "key")
        account_limits = principal.account_limits
        if account_limits is None or not _any_limit(account_limits):
            return decision
        shared = await self.limiter.acquire(_account_key(principal), request_id, account_limits, tokens)
        if not shared.allowed:
            if _any_limit(limits):
                await self.limiter.release(principal.key_id, request_id, limits, tokens, 0)
            raise _limited(shared, "account")
        return decision

    async def release(self, principal: Principal, request_id: str, limits: Limits, estimated: int,
                      actual: int) -> None:
        if _any_limit(limits):
            await self.limiter.release(principal.key_id, request_id, limits, estimated, actual)
        if principal.account_limits is not None and _any_limit(principal.account_limits):
            await self.limiter.release(_account_key(principal), request_id, principal.account_limits, estimated,
                                       actual)

    # -- the gate (core/admission.py Gate): refused requests and large bodies ----------------------------------

    def counted(self, request_id: str) -> None:
        """The limiter counted this request and it failed: its refusal is not counted again."""
        counted = self._counted
        if len(counted) >= _COUNTED_MAX:
            del counted[next(iter(counted))]
        counted[request_id] = None

    def precheck(self, principal: Principal) -> None:
        if not self._held_back:  # the usual case: one truth test
            return
        for scope, key, limits in _rpm_buckets(principal):
            noted = self._held_back.get(key)
            if noted is None:
                continue
            noted_limits, level, at = noted
            decision = None
            if noted_limits == limits:  # a limit changed since: the note says nothing of the new one
                assert limits.rpm is not None
                decision = decide(requests_only(limits), 0, drain(level, self._now_ms() - at, limits.rpm), 0, 0)
            if decision is None or decision.allowed:
                del self._held_back[key]
                continue
            raise _rpm_refusal(decision, scope)

    async def servable(self, principal: Principal) -> None:
        if principal.admin or principal.token_id is None:
            return
        for scope, key, limits in _rpm_buckets(principal):  # the key's rpm, then its account's (all its keys)
            decision = await self.limiter.peek(key, limits)
            if not decision.allowed:
                if decision.reason == "store_unavailable":  # fail_closed: admit would refuse it the same way
                    raise GatewayError(503, "rate_limiter_unavailable", _limit_message(decision.reason),
                                       headers={"retry-after": "1", **decision.headers})
                raise self._past_rpm(key, limits, decision, scope)
        # A model priced 0 would serve a token with nothing left, but which model is asked for is in the unparsed
        # body: such a token's large bodies are refused too. An operator who gives tokens free models gives them
        # a nominal balance (1 micro-credit is enough) or raises GROKGATE_PARSE_OFFLOAD_BYTES.
        if principal.balance is not None and principal.balance <= 0:
            raise GatewayError(403, "used_up", USED_UP, headers={"x-grokgate-limit": "account.balance"},
                               limit={"type": "balance", "scope": "account", "available": 0,
                                      "available_credits": "0"})

    async def refused(self, principal: Principal, request_id: str, error: GatewayError) -> GatewayError:
        if self._counted and request_id in self._counted:
            del self._counted[request_id]
            return error
        if (principal.admin or principal.token_id is None or error.status == 429
                or error.status >= 500):  # a 5xx is grokgate's failure, not a refusal
            return error
        full = await self._count(principal)
        if full is None or full[2].reason == "store_unavailable":
            return error
        return self._past_rpm(*full)

    async def count_request(self, principal: Principal) -> None:
        """One request against the key's rpm and its account's, not tpm, no credits (xAI's Tokenize and model
        listings: api/xai_info.py): 429 naming the full one, 503 when the limits cannot be checked and the limiter
        fails closed. Admin and static keys have no limits."""
        if principal.admin or principal.token_id is None:
            return
        full = await self._count(principal)
        if full is None:
            return
        decision = full[2]
        if decision.reason == "store_unavailable":
            raise GatewayError(503, "rate_limiter_unavailable", _limit_message(decision.reason),
                               headers={"retry-after": "1", **decision.headers})
        raise self._past_rpm(*full)

    async def _count(self, principal: Principal) -> tuple[str, Limits, Decision, str] | None:
        """Count a request refused before `acquire` against the key's rpm, then its account's: the first that is
        full (its bucket, limits, decision and scope), or None when each had room (the request counts in both)."""
        for scope, key, limits in _rpm_buckets(principal):
            decision = await self.limiter.count_refusal(key, limits)
            if not decision.allowed:
                return key, limits, decision, scope
        return None

    def _past_rpm(self, key: str, limits: Limits, decision: Decision, scope: str = "key") -> GatewayError:
        """429 for a bucket (a key's, or an account's: all its keys) found past its rpm, noted for `precheck`."""
        rpm = limits.rpm
        assert rpm is not None
        if len(self._held_back) >= _HELD_BACK_MAX:
            self._held_back.clear()
        # The lowest level that waits `retry_after` (whole ms) for one more request (core/limits.py wait_ms): the
        # bucket holds at least this much, so `precheck` never refuses longer than the bucket would.
        wait_ms = round(decision.retry_after * 1000)
        self._held_back[key] = (limits, (wait_ms - 1) * rpm + 1 + (rpm - 1) * WINDOW_MS, self._now_ms())
        return _rpm_refusal(decision, scope)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


def principal_of(record: TokenRecord) -> Principal:
    return Principal(
        key_id=f"tok-{record.id}",
        prefix=record.prefix,
        token_id=record.id,
        allowed_models=record.allowed_models,
        limits=Limits(rpm=record.rpm, tpm=record.tpm, concurrency=record.max_concurrency),
        balance=record.balance,
        account_id=record.account_id,
        account_limits=record.account_limits,
        limit_period=record.limit_period,
    )


def _account_key(principal: Principal) -> str:
    """The limiter's key of an account's own limits (its keys' are `tok-<id>`)."""
    return f"acct-{principal.account_id}"


def _rpm_buckets(principal: Principal) -> list[tuple[str, str, Limits]]:
    """The rpm buckets a request of `principal` counts against, as (scope, limiter key, limits): the key's, then its
    account's (all its keys together), each only when it has an rpm."""
    buckets = []
    if principal.limits is not None and principal.limits.rpm is not None:
        buckets.append(("key", principal.key_id, principal.limits))
    account = principal.account_limits
    if account is not None and account.rpm is not None and principal.account_id is not None:
        buckets.append(("account", _account_key(principal), account))
    return buckets


def _limit_message(reason: str | None, scope: str = "key") -> str:
    if reason == "concurrency":
        return "Concurrency limit exceeded for this " + ("account." if scope == "account" else "token.")
    if reason == "store_unavailable":
        return "Rate limits cannot be checked right now; retry shortly."
    if scope == "account":
        return "Your account has exceeded its rate limit (shared by all its keys)."
    return "You have exceeded the rate limit."


def _limited(decision: Decision, scope: str) -> GatewayError:
    """429 (503 when the limit store is down and limits fail closed) naming the limit: `error.limit` says the
    scope (key, or the account: all its keys together) and which of rpm, tpm, concurrency; the headers the rest."""
    detail: dict[str, object] = {"type": decision.reason, "scope": scope, "retry_after": decision.retry_after}
    headers = {"x-grokgate-limit": f"{scope}.{decision.reason}", **decision.headers}
    if decision.reason == "store_unavailable":  # fail_closed, and the limit store is down
        return GatewayError(503, "rate_limiter_unavailable", _limit_message(decision.reason),
                            headers={"retry-after": "1", **headers}, limit=detail)
    return GatewayError(429, "too_many_requests", _limit_message(decision.reason, scope), headers=headers,
                        limit=detail)


def _rpm_refusal(decision: Decision, scope: str) -> GatewayError:
    """429 for a request refused early (before admission) because the key's or the account's rpm is spent: named
    as admission's own refusals are (`_limited`)."""
    return GatewayError(429, "too_many_requests", _limit_message("rpm", scope),
                        headers={"x-grokgate-limit": f"{scope}.rpm", **decision.headers},
                        limit={"type": "rpm", "scope": scope, "retry_after": decision.retry_after})


def _affordable_output(available: int, prompt: int, choices: int, output: int, price: Price,
                       request: AdmissionRequest, policy: BillingPolicy) -> int:
    """The largest output cap per choice (at most `output`) whose reservation `available` covers; 0 if none."""
    low, high = 0, output
    while low < high:  # the cost grows with the cap: the last cap that fits
        middle = (low + high + 1) // 2
        cost = max_cost(prompt, choices, middle, price, server_tool_calls=request.server_tool_calls,
                        tool_call_price=policy.server_tool_call_price)
        if cost <= available:
            low = middle
        else:
            high = middle - 1
    fits = max_cost(prompt, choices, low, price, server_tool_calls=request.server_tool_calls,
                    tool_call_price=policy.server_tool_call_price) <= available
    return low if fits else 0


def _short(outcome: Reserved, request: AdmissionRequest, prompt: int, output: int, price: Price, amount: int,
           policy: BillingPolicy, resets: int | None) -> GatewayError:
    """The refusal of a reservation that the account's balance or the key's spending limit cannot hold. An empty
    balance is AceData's `used_up`, as is a balance too short for this request (its message and code unchanged);
    `error.limit` says which limit and how much: what the request needs, what is available, and the output tokens
    that would fit (as OpenRouter says: "you requested up to N tokens, but can only afford M")."""
    available = outcome.available
    affordable = _affordable_output(available, prompt, request.choices, output, price, request, policy)
    scope = "account" if outcome.limit == "balance" else "key"
    detail: dict[str, object] = {
        "type": outcome.limit, "scope": scope, "required": amount, "available": available,
        "required_credits": format_credits(amount), "available_credits": format_credits(available),
        "requested_tokens": output, "affordable_tokens": affordable,
        "message": (f"You requested up to {output} output tokens, but can only afford {affordable}"
                    + (f" (the prompt needs up to {prompt} tokens)." if affordable == 0 else ".")),
    }
    headers = {"x-grokgate-limit": f"{scope}.{outcome.limit}"}
    if outcome.limit == "key_limit":
        detail["resets_at"] = None if resets is None else resets // 1000
        when = "" if resets is None else " until the period resets"
        return GatewayError(403, "key_limit_exceeded",
                            f"This key has reached its spending limit{when}: {format_credits(available)} credits "
                            f"left, this request needs up to {format_credits(amount)}. {detail['message']}",
                            headers=headers, limit=detail)
    return GatewayError(403, "used_up", USED_UP, headers=headers, limit=detail)
