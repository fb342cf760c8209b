"""Secrets out of text that crosses a wall: an upstream's error message may echo what it was sent (vLLM repeats a
bad field's value, some servers the Authorization header), and grokgate passes such messages to clients, logs and
cassettes. `redact` replaces whatever is shaped like a credential: the value of an Authorization or API-key header
or parameter, a bearer token, a prefixed API key (`sk-...`, `xai-...`, grokgate's own `gg-...`), a long run of
key characters with letters and digits mixed (hex digests, base64 secrets), and any `secrets` the caller names
by value (a backend's own keys, whatever their shape). Ordinary words, numbers, model ids (`grok-4-0709`), ids of
a few characters and UUIDs pass, so the message stays readable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[redacted]"
# A secret named by value shorter than this is left alone: replacing every "abc" would ruin the text, and no
# real key is that short.
MIN_SECRET = 4

# `Authorization: Bearer x`, `'x-api-key': 'x'`, `api_key=x`: whatever the value, it is a credential.
_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization|x-api-key|api[-_]?key|access[-_]token)(['\"]?\s*[:=]\s*['\"]?)"
                     r"(?!(?:(?:bearer|basic)(?:\s+|%20))?\[redacted\])"  # already redacted (a named secret)
                     r"(?:(bearer|basic)(\s+|%20))?[^\s'\",;})\]]+")
# A scheme followed by a token-shaped value (one with a digit or a token symbol, so "basic authentication" is prose).
_BEARER = re.compile(r"(?i)\b(bearer|basic)(\s+)(?=[A-Za-z0-9._~+/=-]*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{6,}")
_TOKEN = re.compile(r"(?i)\b(token)(=|:\s*)[A-Za-z0-9._~+/=-]{6,}")
_PREFIXED = re.compile(r"\b(?:sk|xai|gg|pk|rk|sess|key|api|tok)[-_][A-Za-z0-9_-]{6,}")
_LONG = re.compile(r"[A-Za-z0-9_+/=-]{16,}")
_SEPARATORS = re.compile(r"[-_]")


def _secretish(match: re.Match[str]) -> str:
    """A run with one part of 16 or more characters, letters and digits mixed: random, not words joined by
    hyphens (a model id) nor a UUID (parts of 4 to 12)."""
    text = match.group(0)
    for part in _SEPARATORS.split(text):
        if len(part) >= 16 and any(c.isalpha() for c in part) and any(c.isdigit() for c in part):
            return REDACTED
    return text


def _header(match: re.Match[str]) -> str:
    scheme = f"{match.group(3)}{match.group(4)}" if match.group(3) else ""
    return f"{match.group(1)}{match.group(2)}{scheme}{REDACTED}"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with anything shaped like a key or bearer token, and every one of `secrets`, replaced by
    `[redacted]`."""
    for secret in sorted({s for s in secrets if len(s) >= MIN_SECRET}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = _HEADER.sub(_header, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _TOKEN.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _PREFIXED.sub(REDACTED, text)
    return _LONG.sub(_secretish, text)
