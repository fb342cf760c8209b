"""Tenants: whose a request is, and so whose everything it leaves behind.

A tenant is the unit of isolation (docs/operations.md, "Running for many tenants"): an account (all its keys are one
customer, and share what they leave behind), or a static key of GROKGATE_API_KEYS (each static or admin key is a
tenant of its own). Everything that outlives a request is keyed by its tenant: stored responses, cached answers,
cassettes, the local engine's prompt cache, the conversation ids upstreams are told. Account ids are never reused
(store/migrations 0004, 0006), so a tenant's id never passes to another account.
"""

from __future__ import annotations

from grokgate.core.admission import Principal


def tenant_id(account_id: int | None, key_id: str) -> str:
    """`account:<id>` for an account's key, `key:<key id>` for a static or admin key (a digest, never the key)."""
    return f"account:{account_id}" if account_id is not None else f"key:{key_id}"


def tenant_of(principal: Principal) -> str:
    return tenant_id(principal.account_id, principal.key_id)
