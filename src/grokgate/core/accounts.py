"""Accounts: API tokens with balances, and the store protocol admission and the admin tools use."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from grokgate.core.budgets import AccountRecord, Hold, Reserved, period_bounds, spent_in
from grokgate.core.errors import GatewayError
from grokgate.core.events import Usage
from grokgate.core.limits import Limits
from grokgate.core.pricing import MICRO, Price

TOKEN_PREFIX = "gg-"
PREFIX_LENGTH = len(TOKEN_PREFIX) + 8  # what display_prefix keeps
ID_MAX = 2**31 - 1  # token ids are 32-bit integers (int4 on PostgreSQL)
NAME_MAX = 200  # the name column's length


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Tokens are random and long, so one unsalted sha256 is enough; only the hash is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def display_prefix(token: str) -> str:
    return token[: len(TOKEN_PREFIX) + 8]


def storable(text: str) -> bool:
    """Text a database column can hold: UTF-8 encodable (no lone surrogates, which argv can carry) and no
    control characters (PostgreSQL refuses NUL in text; the others only make names unreadable)."""
    return _encodable(text) and not any(unicodedata.category(c) == "Cc" for c in text)


def check_text(value: str, param: str, *, max_length: int = NAME_MAX) -> str:
    """A name-like field (a token's name, a model's): 1..max_length storable characters, not blank."""
    if not value.strip():
        raise GatewayError(400, "bad_request", f"'{param}' must not be empty or blank.", param=param)
    if len(value) > max_length:
        raise GatewayError(400, "bad_request", f"'{param}' is longer than {max_length} characters.", param=param)
    if not storable(value):
        raise GatewayError(400, "bad_request", f"'{param}' must not contain control characters.", param=param)
    return value


def check_token_name(name: str) -> str:
    """Names are references too (`/admin/keys/{ref}`, `grokgate credits add REF`), so a name must never read
    as an id or a prefix: a token named "2" would otherwise be confused with the token whose id is 2."""
    check_text(name, "name")
    bare = name.strip()
    if bare.isascii() and bare.isdigit():  # only ASCII digits are ids (parse_ref)
        raise GatewayError(400, "bad_request", f"A token name cannot be a number ({name!r} reads as a token id).",
                           param="name")
    if bare.lower().startswith(TOKEN_PREFIX):
        raise GatewayError(400, "bad_request",
                           f"A token name cannot start with {TOKEN_PREFIX!r} (it reads as a token prefix).",
                           param="name")
    return name


@dataclass(frozen=True, slots=True)
class TokenRef:
    """Everything one reference may mean. A token matches when it has this id, this prefix or this name; a
    reference that matches two tokens is refused (tokens named before names were checked can read as ids)."""

    text: str
    id: int | None
    prefix: str | None
    name: str | None

    @property
    def empty(self) -> bool:
        return self.id is None and self.prefix is None and self.name is None


def parse_ref(ref: int | str) -> TokenRef:
    """Only ASCII digits are an id (int() and str.isdigit() also take "١" or "²"), and only within the id
    column's range: anything else cannot be an id, so it is looked up as a name (and is simply not found)."""
    if isinstance(ref, int):
        return TokenRef(str(ref), ref if 1 <= ref <= ID_MAX else None, None, None)
    token_id = None
    digits = ref.lstrip("0")
    if ref.isascii() and ref.isdigit() and len(digits) <= len(str(ID_MAX)) and 1 <= int(digits or "0") <= ID_MAX:
        token_id = int(digits)
    prefix = ref[:PREFIX_LENGTH] if ref.startswith(TOKEN_PREFIX) and storable(ref) else None
    name = ref if 0 < len(ref) <= NAME_MAX and _encodable(ref) else None
    return TokenRef(ref, token_id, prefix, name)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def ambiguous(ref: str, candidates: list[TokenRecord]) -> GatewayError:
    """409 naming every token a reference matches, with what tells them apart."""
    listed = "; ".join(f"id {t.id} ({t.prefix}, named {t.name!r})" for t in candidates)
    return GatewayError(409, "ambiguous_reference",
                        f"{ref!r} matches {len(candidates)} tokens: {listed}. Use the id or the prefix of the one "
                        "you mean, or rename one of them.")


def now_ms() -> int:
    return int(time.time() * 1000)


# -- amounts of credits, as people and the admin API write them --------------------------------------------------
#
# One format for initial credits, top-ups and prices, stated in the OpenAPI document (credits_schema) and
# checked here, so that what the document allows is exactly what is taken: a string of ASCII digits with at most
# 6 decimals ("10", "0.25"), or a whole number of credits times 10^-k written "Ne-k" (k = 1..6: "1500e-6" is
# 1500 micro-credits), or a JSON integer; always below 10^9 credits (10^15 micro-credits, far below int64).
# JSON numbers with a fraction are refused: a binary float cannot say 0.1 exactly, and money here is exact.
# `\d` is not used: in Python it also matches "١" or "１", which Decimal() would read as digits.

CREDITS_MAX = 999_999_999  # whole credits; with 6 decimals every amount stays below 10**15 micro-credits
_PLAIN = r"[0-9]{1,9}(\.[0-9]{1,6})?"
# "Ne-k" is N x 10^-k credits, i.e. N x 10^(6-k) micro-credits: N may have 9 + k digits and stay in bounds.
_SCALED = [rf"[0-9]{{1,{9 + k}}}[eE]-{k}" for k in range(1, 7)]
CREDITS_PATTERN = "^(" + "|".join([_PLAIN, *_SCALED]) + ")$"
ZERO_PATTERN = r"^0+(\.0+)?([eE]-[1-6])?$"  # the strings CREDITS_PATTERN allows that mean zero
_CREDITS_RE = re.compile(CREDITS_PATTERN)
_CREDITS_HELP = ('a number of credits as a string ("10", "0.25": at most 6 decimals; "1500e-6": micro-credits) '
                 f"or a whole number, below {CREDITS_MAX + 1:,}")


def credits_schema(*, positive: bool, nullable: bool = False) -> dict[str, object]:
    """The JSON schema of an amount of credits (parse_credits' rule), for the OpenAPI document."""
    text: dict[str, object] = {"type": "string", "pattern": CREDITS_PATTERN}
    if positive:
        text["not"] = {"pattern": ZERO_PATTERN}
    whole: dict[str, object] = {"type": "integer", "minimum": 1 if positive else 0, "maximum": CREDITS_MAX}
    forms: list[dict[str, object]] = [text, whole, {"type": "null"}] if nullable else [text, whole]
    return {"anyOf": forms,
            "description": ("More than zero: " if positive else "Zero or more: ") + _CREDITS_HELP}


def parse_credits(value: object, param: str = "amount", *, allow_zero: bool = False) -> int:
    """Credits as written by a person or a client ("10", "0.25", 3) -> micro-credits, exactly. Refuses what
    CREDITS_PATTERN does not describe, negatives, zero unless `allow_zero`, and anything from 10^9 credits."""
    micro: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        micro = value * MICRO if 0 <= value <= CREDITS_MAX else None
    elif isinstance(value, float) and value.is_integer():  # JSON 2.0: an integer by JSON Schema's rule
        micro = int(value) * MICRO if 0 <= value <= CREDITS_MAX else None
    elif isinstance(value, str) and _CREDITS_RE.fullmatch(value):
        micro = int(Decimal(value) * MICRO)  # exact: the pattern allows no more than 6 decimals in any form
    if micro is None:
        raise GatewayError(400, "bad_request", f"'{param}' must be {_CREDITS_HELP}; got {value!r}.", param=param)
    if micro == 0 and not allow_zero:
        raise GatewayError(400, "bad_request", f"'{param}' must be a positive number of credits.", param=param)
    return micro


def parse_price(value: object, param: str) -> int:
    """A price in credits per million tokens (zero is a valid price) -> micro-credits per million tokens."""
    return parse_credits(value, param, allow_zero=True)


def format_credits(micro: int) -> str:
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{frac:06d}".rstrip("0").rstrip(".") if frac else f"{sign}{whole}"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A key, read with its account: `balance` and `reserved` are the account's (its keys share them)."""

    id: int
    name: str
    prefix: str
    created_at: int
    expires_at: int | None
    disabled: bool
    allowed_models: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    balance: int
    reserved: int
    account_id: int = 0
    account_name: str = ""
    account_disabled: bool = False
    account_limits: Limits | None = None
    # The key's spending limit (micro-credits; None: only the balance bounds it), its reset period (None: never)
    # and its counters as stored: the period they belong to, settled spend, what requests in flight hold.
    spend_limit: int | None = None
    limit_period: str | None = None
    period_start: int = 0
    period_spent: int = 0
    period_reserved: int = 0
    rotated_at: int | None = None  # when its secret was last rotated (ms)
    previous_valid_until: int | None = None  # until when the secret before that one still works (ms)

    def spend(self, now: int) -> tuple[int, int, int | None]:
        """(spent, reserved, resets_at ms or None) of the period holding `now`."""
        start, end = period_bounds(self.limit_period, now)
        return (spent_in(start, self.period_start, self.period_spent),
                spent_in(start, self.period_start, self.period_reserved), end)

    def cap(self, now: int) -> dict[str, object]:
        """The key's spending limit as its holder and the admin see it."""
        spent, reserved, resets = self.spend(now)
        remaining = None if self.spend_limit is None else max(0, self.spend_limit - spent - reserved)
        return {
            "limit": self.spend_limit,
            "limit_credits": None if self.spend_limit is None else format_credits(self.spend_limit),
            "period": self.limit_period,
            "spent": spent,
            "spent_credits": format_credits(spent),
            "reserved": reserved,
            "remaining": remaining,
            "resets_at": None if resets is None else resets // 1000,
        }

    def public(self, now: int | None = None) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "account_id": self.account_id,
            "account_name": self.account_name,
            "created_at": self.created_at // 1000,
            "expires_at": self.expires_at // 1000 if self.expires_at else None,
            "disabled": self.disabled,
            "allowed_models": list(self.allowed_models) if self.allowed_models is not None else None,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_concurrency": self.max_concurrency,
            "balance": self.balance,
            "reserved": self.reserved,
            "balance_credits": format_credits(self.balance),
            "spend": self.cap(now_ms() if now is None else now),
            "rotated_at": self.rotated_at // 1000 if self.rotated_at else None,
            "previous_valid_until": (self.previous_valid_until // 1000 if self.previous_valid_until else None),
        }


@dataclass(frozen=True, slots=True)
class Settlement:
    """The end of one request, as the ledger records it."""

    request_id: str
    token_id: int | None
    model: str
    backend: str
    usage: Usage
    cost: int
    price_version: int | None
    status: str  # ok | client_disconnected | error
    estimated: bool
    duration_ms: int
    reserved: int  # what admission held for it (0 when nothing was reserved)
    endpoint: str = "chat"  # the API the request came through: chat | responses (AdmissionRequest.endpoint)
    account_id: int | None = None  # the key's account, which is charged (None: a bootstrap admin token)
    period_start: int = 0  # the key's period the request was admitted in (core/budgets.py Hold)
    limit_period: str | None = None  # the reset period `period_start` is of (core/budgets.py Hold)


class StoreUnavailable(Exception):
    """The accounts database did not answer (refused, reset, timed out). What was sent may or may not have
    committed: a store that raises this for a reservation releases it once the database is back, and a
    settlement is not raised but kept and committed then (store/holds.py), once, by its request id."""


class AccountStore(Protocol):
    async def find_token(self, token_hash: str) -> TokenRecord | None: ...

    async def current_price(self, model: str) -> Price | None: ...

    async def reserve(self, hold: Hold) -> Reserved:
        """Atomically move `hold.amount` from the account's balance to reserved, and count it against the key's
        room in `hold.period_start`'s period; refused (saying which) when either is short."""

    async def settle(self, settlement: Settlement) -> None:
        """Charge the cost, release the rest of the reservation, append the ledger row: once per request."""


class ReportStore(Protocol):
    """Read-only reports on the ledger and the daily aggregates (store/reports.py): what the account and ledger
    APIs read. Rows are plain dicts of column values."""

    async def usage(self, *, token_id: int | None = None, since: str | None = None,
                    by: str = "day", account_id: int | None = None) -> list[dict[str, Any]]: ...

    async def ledger_rows(self, *, token_id: int | None = None, since_ms: int | None = None,
                          limit: int = 1000, account_id: int | None = None) -> list[dict[str, Any]]: ...

    async def ledger_page(self, *, limit: int = 100, **filters: Any) -> tuple[list[dict[str, Any]], bool]: ...

    async def ledger_errors(self, *, token_id: int | None = None, since_ms: int,
                            until_ms: int, account_id: int | None = None) -> list[dict[str, Any]]: ...

    def to_csv(self, rows: list[dict[str, Any]]) -> str:
        """Report rows as CSV (one column per key of the first row; no rows: an empty body)."""


class AdminStore(ReportStore, Protocol):
    """Tokens, credits and prices, as the admin API, the console and the CLI change them (store/sql.py)."""

    async def create_token(self, name: str, *, allowed_models: list[str] | None = None,
                           expires_at: int | None = None, rpm: int | None = None, tpm: int | None = None,
                           max_concurrency: int | None = None, account_id: int | None = None,
                           spend_limit: int | None = None,
                           limit_period: str | None = None) -> tuple[TokenRecord, str]:
        """A new key of `account_id`, or of a new account of its own named like it (None)."""

    async def rotate_token(self, token_id: int, grace_ms: int) -> tuple[TokenRecord, str]:
        """A new secret for the key; the one it had keeps working for `grace_ms` (0: not at all)."""

    async def list_tokens(self) -> list[TokenRecord]: ...

    async def require_token(self, ref: int | str) -> TokenRecord:
        """The one token `ref` (id, prefix or name) names: 404 if none, 409 if it could mean several."""

    async def update_token(self, token_id: int, **fields: Any) -> TokenRecord: ...

    async def delete_token(self, token_id: int) -> None: ...

    async def add_credits(self, token_id: int, amount: int, note: str | None = None) -> TokenRecord:
        """Top up the key's account (the ledger row names the key)."""

    async def create_account(self, name: str, *, rpm: int | None = None, tpm: int | None = None,
                             max_concurrency: int | None = None) -> AccountRecord: ...

    async def list_accounts(self) -> list[AccountRecord]: ...

    async def require_account(self, ref: int | str) -> AccountRecord:
        """The one account `ref` (id or name) names: 404 if none, 409 if it could mean several."""

    async def update_account(self, account_id: int, **fields: Any) -> AccountRecord: ...

    async def add_account_credits(self, account_id: int, amount: int, note: str | None = None) -> AccountRecord: ...

    async def account_keys(self, account_id: int) -> list[TokenRecord]: ...

    async def current_prices(self) -> dict[str, Price]: ...

    async def price_history(self, model: str | None = None) -> list[Price]: ...

    async def set_price(self, price: Price) -> Price: ...
