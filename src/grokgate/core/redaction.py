"""Secrets out of text that crosses a wall: an upstream's error message may echo what it was sent (vLLM repeats a
bad field's value, some servers the Authorization header), and grokgate passes such messages to clients, logs and
cassettes. `redact` replaces whatever is shaped like a credential: a bearer token, a prefixed API key (`sk-...`,
`xai-...`, grokgate's own `gg-...`), a long run of key characters with letters and digits mixed (hex digests,
base64 secrets). Ordinary words, numbers and ids of a few characters pass.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"

_BEARER = re.compile(r"(?i)\b(bearer|basic|token)(\s+|=|:\s*)[A-Za-z0-9._~+/=-]{6,}")
_PREFIXED = re.compile(r"\b(?:sk|xai|gg|pk|rk|sess|key|api|tok)[-_][A-Za-z0-9_-]{6,}")
_LONG = re.compile(r"[A-Za-z0-9_+/=-]{24,}")


def _secretish(match: re.Match[str]) -> str:
    text = match.group(0)
    letters = sum(c.isalpha() for c in text)
    digits = sum(c.isdigit() for c in text)
    return REDACTED if letters and digits else text


def redact(text: str) -> str:
    """`text` with anything shaped like a key or bearer token replaced by `[redacted]`."""
    text = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _PREFIXED.sub(REDACTED, text)
    return _LONG.sub(_secretish, text)
