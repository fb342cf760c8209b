"""What an upstream's refusal means, read from its status and its structured fields, never from its text.

An upstream's error message is written for whoever sent the request, and it often repeats what was sent (vLLM
quotes a bad field's value, some servers the Authorization header): so it decides nothing here, and it leaves
grokgate only redacted (core/redaction.py; the backend's own keys by value too). What decides:

- A key's health (providers/openai_compat.py `_failure`): 401 and 402 are the key's (its credentials, its
  account's credit) and 429 its rate limit; a 400 is the request's. A 403 is the key's too, unless the upstream
  says otherwise: an upstream that gives a refused key and a refused request the same status (xAI answers a wrong
  key with 400, "Incorrect API key provided", and a 403 may be the key's or only this request's: tests/fakes/
  fake_xai.py) is asked about the key alone (`UpstreamKey.refused`), by a request that carries nothing of the
  caller's, so what a caller sends never cools a key that every tenant shares.
- An error inside a 200 reply (a chat stream's error chunk, a Responses `error` or `response.failed`) is the
  request's when its fields say so (`request_fault`): then it is the caller's 400, and no breaker counts it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDictProxy

from grokgate.core.breaker import Breaker
from grokgate.core.redaction import redact

# A key a check vouched for (found good, or could not tell) is not asked about again for this long: whatever
# callers send, the upstream is asked about a key at most this often, and a key revoked in the meantime is found
# out at most this late. (A 200 does not vouch: a key refused a moment after its last success is found out at
# once, as a key revoked under traffic is.)
KEY_CHECK_TTL = 5.0
KEY_CHECK_TIMEOUT = 10.0
MESSAGE_CHARS = 500  # of an upstream's message, kept for the caller
_SCANNED = 4 * MESSAGE_CHARS  # what redaction reads of a longer message (whatever follows is cut anyway)

_CUT_WORD = re.compile(r"[^\s'\",;:{}()\[\]]+$")

KeyCheck = Callable[["UpstreamKey"], Awaitable[bool | None]]


@dataclass
class UpstreamKey:
    value: str
    breaker: Breaker = field(default_factory=Breaker)
    # The key's name in rendezvous hashing: a hash of the key, so that adding or removing another key moves only
    # its own conversations, and the key itself is never hashed with anything a client sends.
    ident: str = field(init=False, repr=False)
    vouched_until: float = field(default=0.0, repr=False)
    _check: asyncio.Task[bool | None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.ident = hashlib.blake2b(self.value.encode(), digest_size=8).hexdigest()

    async def refused(self, check: KeyCheck) -> bool | None:
        """Whether the upstream refuses this key itself (True), accepts it (False), or cannot say (None), after an
        answer whose status the key and the request share. Asked of `check` unless a check vouched for it lately;
        requests that meet such an answer at once share one check, which outlives a caller that leaves."""
        if time.monotonic() < self.vouched_until:
            return False
        if self._check is None:
            self._check = asyncio.ensure_future(self._run(check))
        return await asyncio.shield(self._check)

    async def _run(self, check: KeyCheck) -> bool | None:
        try:
            verdict = await check(self)
        finally:
            self._check = None
        if verdict is not True:  # good, or unknown: a key is never cooled on doubt, nor asked about on every refusal
            self.vouched_until = time.monotonic() + KEY_CHECK_TTL
        return verdict

    def cancel_check(self) -> None:
        if self._check is not None:
            self._check.cancel()


def request_fault(error: Any) -> bool:
    """Whether an error object an upstream sent inside a 200 reply blames the request, by its fields: vLLM's
    carries the HTTP status as an integer `code` (400 unless it says otherwise), OpenAI's the type
    `invalid_request_error`. A timeout or rate limit (408, 429) is not the request's content."""
    if not isinstance(error, dict):
        return False
    code = error.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 500 and code not in (408, 429):
        return True
    return error.get("type") == "invalid_request_error"


def upstream_message(raw: bytes | str, secrets: Iterable[str] = ()) -> str:
    """The message of an upstream error body (xAI's flat `{code, error}`, OpenAI's `{error: {message}}`, vLLM's
    `{message}`), redacted: anything shaped like a credential, and `secrets`, become `[redacted]`."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        return clean(text.strip(), secrets) or "no details"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            return clean(str(error.get("message") or error), secrets)
        if error:
            return clean(str(error), secrets)
        return clean(str(body.get("message") or body.get("code") or body), secrets)
    return clean(str(body), secrets)


def error_text(error: Any, secrets: Iterable[str] = ()) -> str:
    """The message of an error object inside a reply (a stream's error event, a failed response), redacted."""
    if isinstance(error, dict):
        message = error.get("message") or error.get("error") or error.get("code")
        if message:
            return clean(str(message), secrets)
    return "no details"


def clean(text: str, secrets: Iterable[str] = ()) -> str:
    """Redacted, then cut: a key cut in two would escape the patterns. Only the start of a long message is read
    (an echo of a huge request must not be scanned whole on the event loop), less any word the bound cut."""
    if len(text) <= _SCANNED:
        return redact(text, secrets)[:MESSAGE_CHARS]
    return _CUT_WORD.sub("", redact(text[:_SCANNED], secrets))[:MESSAGE_CHARS]


def retry_after(headers: CIMultiDictProxy[str]) -> float | None:
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return float(value)
        except ValueError:
            return None
    return None
