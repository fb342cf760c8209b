"""Accounts: API tokens with balances, and the store protocol admission and the admin tools use."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Protocol

from grokgate.core.errors import GatewayError
from grokgate.core.events import Usage
from grokgate.core.pricing import MICRO, Price

TOKEN_PREFIX = "gg-"


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Tokens are random and long, so one unsalted sha256 is enough; only the hash is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def display_prefix(token: str) -> str:
    return token[: len(TOKEN_PREFIX) + 8]


def now_ms() -> int:
    return int(time.time() * 1000)


def parse_credits(text: str | int | float | Decimal) -> int:
    """Credits as written by a person ("10", "0.25") -> micro-credits, exactly; refuses negatives and junk."""
    try:
        value = Decimal(str(text).strip())
    except (InvalidOperation, ValueError):
        raise GatewayError(400, "bad_request", f"Not an amount of credits: {text!r}.", param="amount") from None
    if not value.is_finite() or value <= 0:
        raise GatewayError(400, "bad_request", "The amount must be a positive number of credits.", param="amount")
    micro = value * MICRO
    if micro != micro.to_integral_value():
        raise GatewayError(400, "bad_request", "Amounts are counted in millionths of a credit at most.",
                           param="amount")
    if micro > 10**15:
        raise GatewayError(400, "bad_request", "The amount is too large.", param="amount")
    return int(micro)


def format_credits(micro: int) -> str:
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{frac:06d}".rstrip("0").rstrip(".") if frac else f"{sign}{whole}"


@dataclass(frozen=True, slots=True)
class TokenRecord:
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

    def public(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
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


class AccountStore(Protocol):
    async def find_token(self, token_hash: str) -> TokenRecord | None: ...

    async def current_price(self, model: str) -> Price | None: ...

    async def reserve(self, token_id: int, request_id: str, amount: int) -> bool:
        """Atomically move `amount` from balance to reserved; False when the balance is short."""

    async def settle(self, settlement: Settlement) -> None:
        """Charge the cost, release the rest of the reservation, append the ledger row: once per request."""
