"""Prompt-cache affinity: one conversation, one id, one backend and key while they are healthy.

Upstreams cache prompts per server: xAI routes a request to the server holding its prefix only when every turn
of a conversation carries the same `x-grok-conv-id` header (chat) or `prompt_cache_key` (Responses API), and a
cache belongs to one API key's team. grokgate's key rotation and weighted routing would scatter a conversation
across keys and backends, so that each turn is billed its whole prompt again. Before a request is generated,
`assign` gives it:

- a cache key, the conversation id the upstream is told (providers/xai.py: the header for chat, the body field
  for the Responses API; providers/openai_compat.py: `prompt_cache_key` where the backend is configured to take
  it). The client's own id comes first: the body's `prompt_cache_key`, else its `x-grok-conv-id` header (the
  body wins: a client that sends both means the body, as xAI's own CLI does for its side calls); without one,
  an id derived from the caller and the conversation's opening (`derived_key`).
- a route key, what providers/router.py hashes over the healthy candidates (rendezvous hashing), so the
  conversation stays on one backend and one key, and a failure moves only the conversations of what failed.

With affinity off (a setting of the app), the client's id still reaches the upstream, but nothing is derived
and the router keeps its rotation.

The derived key hashes the principal's scope (`core/responses.py owner_of`: the account token's id or the static
key's index, never the token) with the first system message and the first user message: both stay the same on
every turn of one conversation (a Responses chain included: its stored turns are replayed in order), so the id
is stable across turns and across replicas, with no state. Two conversations of one caller that open with the
same messages share an id, and so a server: they share that cached prefix too.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from grokgate.core.admission import Principal
from grokgate.core.responses import owner_of
from grokgate.schemas.chat import ChatCompletionRequest, Message

DERIVED_PREFIX = "gg-"  # a derived id; 35 characters in all, within OpenAI's 64
# The client's id is used as it is where it can travel as an HTTP header value (printable ASCII); otherwise its
# hash does, so a body field with a newline or non-ASCII text never becomes a broken or injected header.
MAX_HEADER_ID = 64  # OpenAI refuses a longer prompt_cache_key (400, not retried): a longer id goes hashed


def assign(request: ChatCompletionRequest, principal: Principal, *, enabled: bool = True) -> None:
    """Set the request's cache key and route key (schemas/chat.py `with_affinity`)."""
    explicit = request.prompt_cache_key or request.conversation_id
    own = header_safe(explicit) if explicit is not None else None
    if not enabled:
        request.with_affinity(own, None)
        return
    key = own if own is not None else derived_key(request.messages, principal)
    request.with_affinity(key, key)


def header_safe(value: str) -> str:
    """The id itself when it is a valid header value, else a stable hash of it."""
    if len(value) <= MAX_HEADER_ID and value.isascii() and value.isprintable() and value.strip() == value:
        return value
    return DERIVED_PREFIX + hashlib.blake2b(value.encode(), digest_size=16).hexdigest()


def derived_key(messages: list[Message], principal: Principal) -> str:
    """A stable id for a conversation: its caller's scope + its first system and first user message."""
    # Only a leading system message: one a framework inserts in a later turn must not change the id.
    system = messages[0] if messages[0].role in ("system", "developer") else None
    user = next((m for m in messages if m.role == "user"), None)
    opening = [(m.role, _content(m)) for m in (system, user) if m is not None] or [(messages[0].role,
                                                                                  _content(messages[0]))]
    digest = hashlib.blake2b(owner_of(principal.token_id, principal.key_id).encode(), digest_size=16)
    digest.update(orjson.dumps(opening))
    return DERIVED_PREFIX + digest.hexdigest()


def _content(message: Message) -> Any:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    return [part.model_dump(exclude_none=True) for part in content]
