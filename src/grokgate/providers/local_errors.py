"""The embedded engine's refusals and failures in grokgate's words (providers/local.py): a 400 names the field it
can, a 500 never carries llama.cpp's text."""

from __future__ import annotations

import logging
from typing import Any

from grokgate.core.errors import GatewayError

log = logging.getLogger("grokgate.local")

# A 500 never carries llama.cpp's text (parser internals, file paths): the server log has it.
ENGINE_FAILED = "The local engine failed to run this request."

# llama.cpp's words when a JSON schema (tools[].function.parameters, response_format) cannot become a grammar.
_SCHEMA_WORDS = ("Unable to generate parser", "JSON schema", "grammar", "min_value or max_value")


def engine_error(error: Any, payload: dict[str, Any]) -> GatewayError:
    if not isinstance(error, dict):
        log.error("local engine error: %s", error)
        return GatewayError(500, "api_error", ENGINE_FAILED)
    code = int(error.get("code", 500) or 500)
    message = str(error.get("message", "the local engine failed"))
    if 400 <= code < 500:
        return refused(message, payload)
    log.error("local engine error %s: %s", code, message)
    return GatewayError(500, "api_error", ENGINE_FAILED)


def refused(message: str, payload: dict[str, Any]) -> GatewayError:
    """A request llama.cpp refused (its own 400): say which field, in our words where we know the case."""
    if any(word in message for word in _SCHEMA_WORDS):  # first: a schema may well name a property "context"
        # The only schema llama.cpp compiles itself is response_format's (a tools grammar it cannot compile is
        # ignored, and caught by providers/local.py's probe).
        schema = (payload.get("response_format") or {}).get("type") == "json_schema"
        param = "response_format" if schema else None
        # The field is `param` (a Responses request's is text.format: serving/responses.py renames it), not the words.
        where = "the structured output's JSON schema" if param else "the JSON schemas of this request"
        detail = message.rsplit("failed: ", 1)[-1].rstrip(".")  # past "Unable to generate parser ... failed: "
        return GatewayError(400, "bad_request", f"The local engine cannot turn {where} into a grammar: {detail}.",
                            param=param)
    return GatewayError(400, "bad_request", message, param="messages" if "context" in message else None)


def too_long(chars: int, limit: int, slot_tokens: int, token_bytes: int) -> GatewayError:
    """A prompt refused before the engine sees it (providers/local.py `check`): more text than a slot's tokens can
    stand for. The code and param of the engine's own context refusal (`refused`), so a client sees one error."""
    return GatewayError(
        400,
        "bad_request",
        f"The prompt cannot fit the local engine's context: it has at least {chars} characters, and a slot holds "
        f"{slot_tokens} tokens of at most {token_bytes} bytes each ({limit} characters at most). Shorten the "
        "conversation.",
        param="messages",
    )
