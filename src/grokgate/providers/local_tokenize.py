"""The embedded engine's own tokenizer, for xAI's Tokenize service (providers/base.py `Tokenizer`).

llama.cpp's HTTP listener, bound to the engine's private Unix socket and key (providers/local.py `_load`), answers
`POST /tokenize` from the model's vocabulary without touching a slot. A text is tokenized as the engine tokenizes a
chat prompt: no BOS added (the chat template writes what the model needs) and special-token text such as
`<|im_end|>` read as that one token, as it is when it stands in a message. So the count is exactly what the text
adds to a prompt's `prompt_tokens`, wherever the template's own text does not merge with it (a message's text
starts after the template's newline: tests/test_xai_sdk_local.py).

Blocking I/O: called in a worker thread (`LocalEngine.tokenize`), never on the event loop. The listener has one
thread, shared with the per-tenant prompt cache's slot saves (providers/local_cache.py); one connection per call,
closed after it, so a kept-alive connection never holds that thread.
"""

from __future__ import annotations

import http.client

import orjson

from grokgate.core.errors import GatewayError
from grokgate.providers.base import Token
from grokgate.providers.local_cache import _UnixConnection

# A tokenize waits behind a slot save in progress (the engine answers those between two batches).
TIMEOUT_SECONDS = 60.0
FAILED = "The local engine could not tokenize the text."


def engine_tokens(socket_path: str, api_key: str, text: str, timeout: float = TIMEOUT_SECONDS) -> list[Token]:
    """The engine's tokens of `text`, with their bytes; a GatewayError (502) when the listener fails."""
    body = orjson.dumps({"content": text, "add_special": False, "parse_special": True, "with_pieces": True})
    conn = _UnixConnection(socket_path, timeout)
    try:
        conn.request("POST", "/tokenize", body=body,
                     headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                              "Connection": "close"})
        response = conn.getresponse()
        raw = response.read()
    except TimeoutError:
        raise GatewayError(504, "timeout", "The local engine did not tokenize the text in time.") from None
    except (OSError, http.client.HTTPException):
        raise GatewayError(502, "api_error", FAILED) from None
    finally:
        conn.close()
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        answer = None
    if response.status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("tokens"), list):
        raise GatewayError(502, "api_error", FAILED)
    return [_token(item) for item in answer["tokens"]]


def _token(item: object) -> Token:
    """`{"id": 9707, "piece": "Hello"}`; a piece that is not whole UTF-8 comes as a list of byte values."""
    if not isinstance(item, dict) or not isinstance(item.get("id"), int):
        raise GatewayError(502, "api_error", FAILED)
    piece = item.get("piece")
    if isinstance(piece, str):
        return Token(item["id"], piece.encode("utf-8", "surrogatepass"), piece)
    if isinstance(piece, list) and all(isinstance(b, int) and 0 <= b < 256 for b in piece):
        data = bytes(piece)
        return Token(item["id"], data, data.decode("utf-8", "replace"))
    raise GatewayError(502, "api_error", FAILED)
