"""Prompt-cache affinity: one conversation, one id, one backend and key while they are healthy.

Upstreams cache prompts per server: xAI routes a request to the server holding its prefix only when every turn
of a conversation carries the same `x-grok-conv-id` header (chat) or `prompt_cache_key` (Responses API), and a
cache belongs to one API key's team. grokgate's key rotation and weighted routing would scatter a conversation
across keys and backends, so that each turn is billed its whole prompt again. Before a request is generated,
`assign` gives it:

- a cache key, the conversation id the upstream is told (providers/xai.py: the header for chat, the body field
  for the Responses API; providers/openai_compat.py: `prompt_cache_key` where the backend is configured to take
  it). The client's own id comes first: the body's `prompt_cache_key`, else its `x-grok-conv-id` header (the
  body wins: a client that sends both means the body, as xAI's own CLI does for its side calls), namespaced by
  its tenant (`scoped`: another tenant sending the same id gets another key, so another server's cache, and
  learns nothing from its hits); without one, an id derived from the tenant and the conversation's opening
  (`derived_key`). A single-tenant deployment can share ids as they are sent (settings.shared_prompt_cache).
- a route key, what providers/router.py hashes over the healthy candidates (rendezvous hashing), so the
  conversation stays on one backend and one key, and a failure moves only the conversations of what failed.

With affinity off (a setting of the app), the client's id still reaches the upstream, but nothing is derived
and the router keeps its rotation.

The derived key hashes the request's tenant (core/tenancy.py: the account token's id or the static
key's digest, never the token) with the first system message and the first user message: both stay the same on
every turn of one conversation (a Responses chain included: its stored turns are replayed in order), so the id
is stable across turns and across replicas, with no state. Two conversations of one caller that open with the
same messages share an id, and so a server: they share that cached prefix too.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from grokgate.providers.base import Call
from grokgate.schemas.chat import Message

DERIVED_PREFIX = "gg-"  # a derived id; 35 characters in all, within OpenAI's 64
# The client's id is used as it is where it can travel as an HTTP header value (printable ASCII); otherwise its
# hash does, so a body field with a newline or non-ASCII text never becomes a broken or injected header.
MAX_HEADER_ID = 64  # OpenAI refuses a longer prompt_cache_key (400, not retried): a longer id goes hashed


def assign(call: Call, enabled: bool = True, *, shared: bool = False) -> tuple[str | None, str | None]:
    """The request's (cache key, route key): what the upstream is told, and what the router hashes (None: no
    affinity). A client's own id is namespaced by its tenant (`scoped`), unless `shared` (a single-tenant
    deployment's opt-out, settings.shared_prompt_cache): two tenants sending the same id must not share a backend
    key's prompt cache, nor learn from its hits what the other sent."""
    request = call.request
    explicit = request.prompt_cache_key or call.conversation_id
    own = None
    if explicit is not None:
        own = header_safe(explicit) if shared else scoped(explicit, call.tenant)
    if not enabled:
        return own, None
    key = own if own is not None else derived_key(request.messages, call.tenant)
    return key, key


def scoped(value: str, tenant: str) -> str:
    """A client's conversation id within its tenant: a stable hash of both, the same on every turn and replica."""
    digest = hashlib.blake2b(tenant.encode(), digest_size=16, person=b"grokgate-conv")
    digest.update(b"\x00" + value.encode())
    return DERIVED_PREFIX + digest.hexdigest()


def header_safe(value: str) -> str:
    """The id itself when it is a valid header value, else a stable hash of it."""
    if len(value) <= MAX_HEADER_ID and value.isascii() and value.isprintable() and value.strip() == value:
        return value
    return DERIVED_PREFIX + hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


def derived_key(messages: list[Message], tenant: str) -> str:
    """A stable id for a conversation: its caller's scope + its first system and first user message."""
    # Only a leading system message: one a framework inserts in a later turn must not change the id.
    system = messages[0] if messages[0].role in ("system", "developer") else None
    user = next((m for m in messages if m.role == "user"), None)
    opening = [(m.role, _content(m)) for m in (system, user) if m is not None] or [(messages[0].role,
                                                                                  _content(messages[0]))]
    digest = hashlib.blake2b(tenant.encode(), digest_size=16)
    digest.update(orjson.dumps(opening))
    return DERIVED_PREFIX + digest.hexdigest()


def _content(message: Message) -> Any:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    return [part.model_dump(exclude_none=True) for part in content]
