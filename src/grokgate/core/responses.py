"""Stored responses of the Responses API: what grokgate keeps of a response so that `previous_response_id` can
rebuild the conversation on any backend, and `GET /responses/{id}` can return it.

grokgate owns this state (not the backend), so a chain survives a fallback from xAI to another backend. A stored
response belongs to the principal that created it (`owner`); every read names the owner, and a response of
another owner is simply not found. Implementations: store/responses_sql.py (SQLite and PostgreSQL, the accounts
database) and store/responses_memory.py (accounts off: bounded, in this process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from grokgate.core.events import JSONObject
from grokgate.core.tenancy import tenant_id


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str  # resp_...
    owner: str  # the principal's scope (`owner_of`)
    created_at: int  # epoch milliseconds
    expires_at: int  # epoch milliseconds: purged after this, and no longer found
    previous_id: str | None  # previous_response_id of the request that made it
    input_items: list[JSONObject]  # this turn's input items, each with its `id` (GET .../input_items lists them)
    response: JSONObject  # the response object as the client received it (status, output, usage...)

    @property
    def output(self) -> list[JSONObject]:
        items = self.response.get("output")
        return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


class ChainTooLong(Exception):
    """A `previous_response_id` chain beyond the bounds given to `chain` (items or bytes)."""


class ResponseStore(Protocol):
    async def save(self, response: StoredResponse, *, max_bytes: int | None = None) -> int | None:
        """Keep it until `expires_at` (an id saved twice keeps the first); the bytes of JSON kept, or None (and
        nothing kept) when they would be more than `max_bytes`. Once called, the save completes even if the
        caller is cancelled: a charged answer is kept also when its client has left."""

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """None when there is none of that id for this owner, or it has expired."""

    async def delete(self, owner: str, response_id: str) -> bool:
        """Whether there was one to delete."""

    async def chain(self, owner: str, response_id: str, *, max_items: int, max_bytes: int) -> list[StoredResponse]:
        """The conversation ending with `response_id`, oldest first, following `previous_id` while the owner's
        responses exist (an expired or deleted link ends the chain there). Empty when `response_id` itself is not
        found. Raises ChainTooLong past `max_items` items (input and output, all turns) or `max_bytes` of JSON."""

    async def purge(self, now_ms: int) -> int:
        """Delete what has expired; how many were deleted."""

    async def stats(self) -> tuple[int, int]:
        """(responses kept, bytes of JSON kept), for the metrics."""


def owner_of(account_id: int | None, key_id: str) -> str:
    """The scope of a principal's stored responses: its tenant (core/tenancy.py), the key's account."""
    return tenant_id(account_id, key_id)


def deferred_owner(owner: str) -> str:
    """The scope of a tenant's deferred completions (serving/deferred.py), kept in the same store: its own, so
    the Responses API and stored chat completions (which read `owner_of`) never find them; no tenant id has '#'."""
    return f"{owner}#deferred"
