"""Record and replay, the pure part: which cassette a request belongs to, its canonical form and hash, how an
exchange (the events a backend sent, with their timing, or its error) is written as plain JSON, and what differs
between a request and the nearest recording when nothing matches.

A cassette is a JSON Lines file, one exchange per line (providers/recording.py reads and appends them):

    {"v": 1, "key": "<hash of request>", "request": {<canonical request>}, "backend": "xai",
     "fingerprint": "fp_...", "recorded_at": "2026-01-01T00:00:00Z",
     "events": [{"t": 12.5, "delta": {"index": 0, "content": "Hi"}}, {"t": 13.0, "finish": {...}}, ...],
     "error": null | {"status": 429, "code": "...", "message": "...", "param": null, "retry_after": "1"},
     "usage_so_far": null | {...}}

`t` is milliseconds since the request reached the backend. Nothing in it comes from the caller's token or an
upstream key: the request is canonical (below) and errors keep only their status, code, message and retry-after.

Matching is on the canonical request: the body as it is forwarded (model, messages or Responses input, tools,
sampling settings, n, the caller's output cap, response format, seed, stop, and any field grokgate does not know,
which an upstream may honour), not how the answer is delivered (`stream`, `stream_options`) nor the prompt-cache
hint. So a recorded stream answers a request that does not stream, and the reverse, in whichever wire format is
asked for now.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from grokgate.core.errors import GatewayError, bad_request
from grokgate.core.events import JSON, Delta, Event, Extra, Finish, Item, JSONObject, Usage, UsageReport

VERSION = 1
HEADER = "x-grokgate-cassette"
DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")

# What a request's canonical form leaves out of the body that is forwarded: how the answer is delivered (`stream`,
# `stream_options`), the conversation id (a routing hint that serving/affinity.py rewrites per tenant before it
# leaves), and the two output-cap fields, which become one `max_tokens`: the caller's cap, whichever field it used.
# Everything else is kept, fields grokgate does not know included: they are forwarded, and an upstream may honour
# them (vLLM's `guided_choice`), so two requests that differ in one are two different questions.
CHAT_DROPPED = frozenset({"stream", "stream_options", "prompt_cache_key", "max_tokens", "max_completion_tokens"})
# A Responses request is matched on its native body without these (`store` is grokgate's: xAI is sent false).
RESPONSES_DROPPED = frozenset({"store", "stream", "stream_options", "prompt_cache_key"})


def cassette_name(value: str | None) -> str:
    """The `x-grokgate-cassette` header's cassette (default `default`), or a 400 naming the header."""
    if value is None:
        return DEFAULT
    if not _NAME.fullmatch(value):
        raise bad_request(f"The {HEADER} header must be 1 to 100 characters of A-Z, a-z, 0-9, '.', '_' or '-'.",
                          HEADER)
    return value


def canonical(chat: JSONObject, output_limit: int | None, native: JSONObject | None) -> JSONObject:
    """The canonical request: the chat body as forwarded (`chat`, already JSON) without its delivery fields, with
    the caller's output cap; or for a Responses request its native body without them."""
    if native is not None:
        return {"responses": {k: v for k, v in native.items() if k not in RESPONSES_DROPPED}}
    out: JSONObject = {k: v for k, v in chat.items() if k not in CHAT_DROPPED and v is not None}
    if output_limit is not None:
        out["max_tokens"] = output_limit
    return out


def request_key(request: JSONObject) -> str:
    """A stable hash of a canonical request (key order and whitespace do not matter)."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def model_of(request: JSONObject) -> str | None:
    inner = request.get("responses")
    source = inner if isinstance(inner, dict) else request
    model = source.get("model")
    return model if isinstance(model, str) else None


# -- events as JSON ----------------------------------------------------------------------------------------------


def encode_event(event: Event, t_ms: float) -> JSONObject:
    out: JSONObject = {"t": round(t_ms, 1)}
    if isinstance(event, Delta):
        delta: JSONObject = {"index": event.index}
        for name in ("content", "reasoning_content", "tool_calls", "logprobs"):
            value = getattr(event, name)
            if value is not None:
                delta[name] = value
        out["delta"] = delta
    elif isinstance(event, Finish):
        out["finish"] = {"index": event.index, "reason": event.reason}
    elif isinstance(event, UsageReport):
        out["usage"] = encode_usage(event.usage)
    elif isinstance(event, Extra):
        out["extra"] = event.fields
    else:
        out["item"] = {"index": event.index, "item": event.item}
    return out


def decode_event(data: JSONObject) -> tuple[float, Event]:
    t = float(_num(data.get("t", 0)))
    if isinstance(delta := data.get("delta"), dict):
        return t, Delta(index=int(_num(delta.get("index", 0))), content=_opt_str(delta.get("content")),
                        logprobs=_opt_objects(delta.get("logprobs")), tool_calls=_opt_objects(delta.get("tool_calls")),
                        reasoning_content=_opt_str(delta.get("reasoning_content")))
    if isinstance(finish := data.get("finish"), dict):
        return t, Finish(index=int(_num(finish.get("index", 0))), reason=str(finish.get("reason")))
    if isinstance(usage := data.get("usage"), dict):
        return t, UsageReport(decode_usage(usage))
    if isinstance(extra := data.get("extra"), dict):
        return t, Extra(extra)
    if isinstance(item := data.get("item"), dict) and isinstance(item.get("item"), dict):
        inner = item["item"]
        assert isinstance(inner, dict)
        return t, Item(index=int(_num(item.get("index", 0))), item=inner)
    raise ValueError(f"not a recorded event: {sorted(data)}")


def encode_usage(usage: Usage) -> JSONObject:
    return dict(asdict(usage))


def decode_usage(data: JSONObject) -> Usage:
    fields = {k: data[k] for k in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
                                   "server_tool_calls") if isinstance(data.get(k), int)}
    return Usage(**fields, estimated=data.get("estimated") is True)  # type: ignore[arg-type]


def encode_error(error: GatewayError) -> JSONObject:
    """What a recorded failure keeps: never a header but retry-after (an upstream's headers may name accounts)."""
    return {"status": error.status, "code": error.code, "message": error.message, "param": error.param,
            "retry_after": error.headers.get("retry-after")}


def decode_error(data: JSONObject) -> GatewayError:
    retry_after = data.get("retry_after")
    param = data.get("param")
    return GatewayError(int(_num(data.get("status", 502))), str(data.get("code") or "api_error"),
                        str(data.get("message") or ""), param=param if isinstance(param, str) else None,
                        headers={"retry-after": str(retry_after)} if retry_after is not None else None)


def _num(value: JSON) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _opt_str(value: JSON) -> str | None:
    return value if isinstance(value, str) else None


def _opt_objects(value: JSON) -> list[JSONObject] | None:
    if not isinstance(value, list):
        return None
    return [v for v in value if isinstance(v, dict)]


# -- exchanges ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Exchange:
    """One recorded request and what came back (a line of a cassette)."""

    key: str
    request: JSONObject
    backend: str
    fingerprint: str
    events: list[JSONObject]
    error: JSONObject | None = None
    usage_so_far: JSONObject | None = None
    recorded_at: str = ""

    def to_json(self) -> JSONObject:
        return {"v": VERSION, "key": self.key, "request": self.request, "backend": self.backend,
                "fingerprint": self.fingerprint, "recorded_at": self.recorded_at, "events": list(self.events),
                "error": self.error, "usage_so_far": self.usage_so_far}

    @classmethod
    def from_json(cls, data: Any) -> Exchange:
        if not isinstance(data, dict) or not isinstance(data.get("request"), dict):
            raise ValueError("not a recorded exchange")
        request: JSONObject = data["request"]
        events = data.get("events") or []
        error = data.get("error")
        so_far = data.get("usage_so_far")
        return cls(key=request_key(request), request=request, backend=str(data.get("backend") or "unknown"),
                   fingerprint=str(data.get("fingerprint") or ""),
                   events=[e for e in events if isinstance(e, dict)] if isinstance(events, list) else [],
                   error=error if isinstance(error, dict) else None,
                   usage_so_far=so_far if isinstance(so_far, dict) else None,
                   recorded_at=str(data.get("recorded_at") or ""))

    def answer(self) -> JSONObject:
        """The exchange without its timing and provenance: two recordings with the same answer are duplicates."""
        return {"events": [{k: v for k, v in e.items() if k != "t"} for e in self.events], "error": self.error}


# -- what differs from the nearest recording ---------------------------------------------------------------------


def differences(recorded: JSON, requested: JSON, path: str = "") -> list[tuple[str, JSON, JSON]]:
    """Every leaf path where two canonical requests differ: (path, recorded value, requested value); a key only
    one side has is a difference with None on the other side."""
    if isinstance(recorded, dict) and isinstance(requested, dict):
        out: list[tuple[str, JSON, JSON]] = []
        for key in sorted(set(recorded) | set(requested)):
            sub = f"{path}.{key}" if path else key
            if key not in recorded or key not in requested:
                out.append((sub, recorded.get(key), requested.get(key)))
            else:
                out += differences(recorded[key], requested[key], sub)
        return out
    if isinstance(recorded, list) and isinstance(requested, list):
        out = []
        for i in range(max(len(recorded), len(requested))):
            sub = f"{path}[{i}]"
            if i >= len(recorded) or i >= len(requested):
                out.append((sub, recorded[i] if i < len(recorded) else None,
                            requested[i] if i < len(requested) else None))
            else:
                out += differences(recorded[i], requested[i], sub)
        return out
    return [] if recorded == requested else [(path or "request", recorded, requested)]


def nearest(recorded: list[JSONObject], requested: JSONObject) -> list[tuple[str, JSON, JSON]] | None:
    """The differences from the closest recording (fewest differing paths); None when there is none."""
    best: list[tuple[str, JSON, JSON]] | None = None
    for candidate in recorded:
        found = differences(candidate, requested)
        if best is None or len(found) < len(best):
            best = found
    return best


def _short(value: JSON) -> str:
    text = "absent" if value is None else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def miss(cassette: str, recorded: list[JSONObject], requested: JSONObject) -> GatewayError:
    """The replay_miss error: no recording of this request in the cassette, and what differs from the nearest."""
    found = nearest(recorded, requested)
    if found is None:
        return GatewayError(404, "replay_miss", f"Replay miss: the cassette '{cassette}' has no recordings.")
    shown = "; ".join(f"{p}: recorded {_short(a)}, requested {_short(b)}" for p, a, b in found[:3])
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    param = re.split(r"[.\[]", found[0][0], maxsplit=1)[0] if found else None
    if param == "responses":  # a Responses body: name its own field (input, tools...)
        parts = re.split(r"[.\[]", found[0][0])
        param = parts[1] if len(parts) > 1 else None
    return GatewayError(404, "replay_miss", f"Replay miss: no recording in the cassette '{cassette}' matches this "
                                            f"request. The nearest recording differs at {shown}{more}.", param=param)
