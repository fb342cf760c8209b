"""Record and replay, the pure part: which cassette a request belongs to, its canonical form and hash, how an
exchange (the events a backend sent, with their timing, or its error) is written as plain JSON, and what differs
between a request and the nearest recording when nothing matches.

A cassette is a JSON Lines file, one exchange per line (providers/cassette_store.py reads and appends them):

    {"v": 2, "key": "<hash of request>", "backend": "xai", "fingerprint": "fp_...",
     "recorded_at": "2026-01-01T00:00:00Z",
     "events": [{"t": 12.5, "delta": {"index": 0, "content": "Hi"}}, {"t": 13.0, "finish": {...}}, ...],
     "error": null, "usage_so_far": null, "request": {<canonical request>}}

`t` is milliseconds since the request reached the backend. Nothing in it comes from the caller's token or an
upstream key: the request is canonical (below) and errors keep only their status, code, message (redacted,
bounded: core/redaction.py) and retry-after.

A failed exchange (`error` set: refused before any output, or cut after some) keeps no request, only its hash, its
model and its size: `"request": null, "model": "grok-3", "request_bytes": 7340032`. A failure is replayed by its
hash like any recording, and a prompt refused for being too large costs its cassette a few hundred bytes, not the
prompt. Version 1 lines (every exchange with its request) are read as they are.

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
from grokgate.core.redaction import redact

VERSION = 2
HEADER = "x-grokgate-cassette"
DEFAULT = "default"
# Not starting with a dot: `..` would be `...jsonl`, a hidden file, and `.x` clashes with what lives beside the
# cassettes (a tenant directory's `.tenant` label).
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
_KEY = re.compile(r"[0-9a-f]{32}")
# What a recorded failure keeps of the upstream's message: enough to read, not a place to store a prompt it echoed.
MESSAGE_CHARS = 1000
# A tenant's cassettes live in TENANTS/<tenant_dir(tenant)> under the cassette directory (docs/replay.md).
TENANTS = "tenants"

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
        raise bad_request(f"The {HEADER} header must be 1 to 100 characters of A-Z, a-z, 0-9, '.', '_' or '-', "
                          "not starting with '.'.", HEADER)
    return value


def tenant_dir(tenant: str) -> str:
    """The directory name of a tenant's cassettes: a digest, so that no tenant id can name a path (and two ids
    never share one)."""
    return "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:32]


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
    return key_of(request_text(request))


def key_of(text: bytes) -> str:
    """The hash of a canonical request already serialized by `request_text`."""
    return hashlib.sha256(text).hexdigest()[:32]


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
                                   "server_tool_calls", "cost_in_usd_ticks") if isinstance(data.get(k), int)}
    return Usage(**fields, estimated=data.get("estimated") is True)  # type: ignore[arg-type]


def encode_error(error: GatewayError) -> JSONObject:
    """What a recorded failure keeps: never a header but retry-after (an upstream's headers may name accounts), and
    its message bounded and with anything shaped like a credential redacted (an upstream may echo its key)."""
    message = redact(error.message[:MESSAGE_CHARS * 2])
    if len(message) > MESSAGE_CHARS:
        message = message[:MESSAGE_CHARS - 3] + "..."
    retry_after = error.headers.get("retry-after")
    return {"status": error.status, "code": error.code[:100], "message": message,
            "param": redact(error.param[:100]) if error.param is not None else None,
            "retry_after": retry_after[:32] if retry_after is not None else None}


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


def request_text(request: JSONObject) -> bytes:
    """A canonical request as it is written and hashed: sorted keys, no whitespace (`request_key` is its hash)."""
    return json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(slots=True)
class Exchange:
    """One recorded request and what came back (a line of a cassette). A failure keeps no `request`: its `key`,
    `model` and `request_bytes` say which request it was."""

    key: str
    request: JSONObject | None
    backend: str
    fingerprint: str
    events: list[JSONObject]
    error: JSONObject | None = None
    usage_so_far: JSONObject | None = None
    recorded_at: str = ""
    model: str | None = None  # a failure's model (with a request, the request's)
    request_bytes: int | None = None  # a failure's request size

    @property
    def model_name(self) -> str | None:
        return model_of(self.request) if self.request is not None else self.model

    def to_json(self) -> JSONObject:
        out: JSONObject = {"v": VERSION, "key": self.key, "backend": self.backend, "fingerprint": self.fingerprint,
                           "recorded_at": self.recorded_at, "events": list(self.events), "error": self.error,
                           "usage_so_far": self.usage_so_far}
        if self.request is None:
            out["model"] = self.model
            out["request_bytes"] = self.request_bytes
        out["request"] = self.request
        return out

    def line(self, text: bytes | None = None) -> bytes:
        """The exchange as one cassette line; `text`, the request already serialized (`request_text`), is used as
        it is rather than serialized again (a prompt may be megabytes)."""
        head = self.to_json()
        del head["request"]
        start = json.dumps(head, ensure_ascii=False, separators=(",", ":"))[:-1].encode()
        if self.request is None:
            return start + b',"request":null}\n'
        return start + b',"request":' + (text if text is not None else request_text(self.request)) + b"}\n"

    @classmethod
    def from_json(cls, data: Any) -> Exchange:
        if not isinstance(data, dict):
            raise ValueError("not a recorded exchange")
        request = data.get("request")
        if isinstance(request, dict):
            key = request_key(request)
        elif request is None and isinstance(data.get("key"), str) and _KEY.fullmatch(data["key"]):
            key = data["key"]  # a failure recorded by its hash
        else:
            raise ValueError("not a recorded exchange: no request and no request key")
        events = data.get("events") or []
        error = data.get("error")
        so_far = data.get("usage_so_far")
        model = data.get("model")
        size = data.get("request_bytes")
        return cls(key=key, request=request, backend=str(data.get("backend") or "unknown"),
                   fingerprint=str(data.get("fingerprint") or ""),
                   events=[e for e in events if isinstance(e, dict)] if isinstance(events, list) else [],
                   error=error if isinstance(error, dict) else None,
                   usage_so_far=so_far if isinstance(so_far, dict) else None,
                   recorded_at=str(data.get("recorded_at") or ""),
                   model=model if isinstance(model, str) else None,
                   request_bytes=size if isinstance(size, int) and not isinstance(size, bool) else None)

    def answer(self) -> JSONObject:
        """The exchange without its timing and provenance: two recordings with the same answer are duplicates."""
        return {"events": [{k: v for k, v in e.items() if k != "t"} for e in self.events], "error": self.error}


# -- what differs from the nearest recording ---------------------------------------------------------------------

# The work of one comparison: values visited. A request of 2,048 messages against a recording of as many is ~6,000;
# past this the comparison stops and says so (docs/replay.md: a miss is bounded work).
COMPARE_NODES = 20_000

Difference = tuple[str, JSON, JSON]


class _Walk:
    """One bounded comparison: stops after `budget` values, or once it has more differences than `enough` (a
    nearer recording is already known)."""

    __slots__ = ("budget", "cut", "enough", "out")

    def __init__(self, budget: int, enough: int | None) -> None:
        self.budget = budget
        self.enough = enough
        self.out: list[Difference] = []
        self.cut = False

    def add(self, path: str, recorded: JSON, requested: JSON) -> None:
        self.out.append((path, recorded, requested))
        if self.enough is not None and len(self.out) > self.enough:
            self.cut = True

    def visit(self, recorded: JSON, requested: JSON, path: str) -> None:
        if self.cut:
            return
        self.budget -= 1
        if self.budget < 0:
            self.cut = True
            return
        if isinstance(recorded, dict) and isinstance(requested, dict):
            for key in sorted(set(recorded) | set(requested)):
                if self.cut:
                    return
                sub = f"{path}.{key}" if path else key
                if key not in recorded or key not in requested:
                    self.add(sub, recorded.get(key), requested.get(key))
                else:
                    self.visit(recorded[key], requested[key], sub)
        elif isinstance(recorded, list) and isinstance(requested, list):
            for i in range(max(len(recorded), len(requested))):
                if self.cut:
                    return
                sub = f"{path}[{i}]"
                if i >= len(recorded) or i >= len(requested):
                    self.add(sub, recorded[i] if i < len(recorded) else None,
                             requested[i] if i < len(requested) else None)
                else:
                    self.visit(recorded[i], requested[i], sub)
        elif recorded != requested:
            self.add(path or "request", recorded, requested)


def differences(recorded: JSON, requested: JSON, path: str = "", *,
                budget: int = COMPARE_NODES) -> list[Difference]:
    """The leaf paths where two canonical requests differ: (path, recorded value, requested value); a key only one
    side has is a difference with None on the other side. At most `budget` values are compared."""
    walk = _Walk(budget, None)
    walk.visit(recorded, requested, path)
    return walk.out


def nearest(recorded: list[JSONObject], requested: JSONObject, *,
            budget: int = COMPARE_NODES) -> list[Difference] | None:
    """The differences from the closest recording (fewest differing paths); None when there is none. Each
    comparison is bounded by `budget` values and stops once it is farther than the nearest so far."""
    best: list[Difference] | None = None
    for candidate in recorded:
        walk = _Walk(budget, len(best) if best is not None else None)
        try:
            walk.visit(candidate, requested, "")
        except RecursionError:  # a hand-edited recording nested past Python's limit: not a candidate
            continue
        if best is None or len(walk.out) < len(best):
            best = walk.out
    return best


def _clip(value: JSON, depth: int = 0) -> JSON:
    """A bounded preview of a value (a few items, short strings), so a miss never serializes a whole prompt."""
    if isinstance(value, str):
        return value[:100]
    if isinstance(value, list):
        return [_clip(v, depth + 1) for v in value[:4]] if depth < 3 else []
    if isinstance(value, dict):
        return {k: _clip(v, depth + 1) for k, v in list(value.items())[:4]} if depth < 3 else {}
    return value


def _short(value: JSON) -> str:
    text = "absent" if value is None else json.dumps(_clip(value), ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def miss(cassette: str, recorded: list[JSONObject], requested: JSONObject, *,
         recordings: int | None = None) -> GatewayError:
    """The replay_miss error: no recording of this request in the cassette, and what differs from the nearest of
    `recorded` (the candidates compared); `recordings`, the cassette's count, when it has more than those (a failure
    keeps no request to compare with)."""
    found = nearest(recorded, requested)
    if found is None:
        if recordings:
            return GatewayError(404, "replay_miss", f"Replay miss: no recording in the cassette '{cassette}' matches "
                                                    f"this request (none of its {recordings} recordings of this "
                                                    f"model keeps a request to compare with).")
        return GatewayError(404, "replay_miss", f"Replay miss: the cassette '{cassette}' has no recordings.")
    if not found:  # the comparison stopped before its first difference
        return GatewayError(404, "replay_miss", f"Replay miss: no recording in the cassette '{cassette}' matches this "
                                                f"request (its nearest recording is too large to compare).")
    shown = "; ".join(f"{p}: recorded {_short(a)}, requested {_short(b)}" for p, a, b in found[:3])
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    param = re.split(r"[.\[]", found[0][0], maxsplit=1)[0] if found else None
    if param == "responses":  # a Responses body: name its own field (input, tools...)
        parts = re.split(r"[.\[]", found[0][0])
        param = parts[1] if len(parts) > 1 else None
    return GatewayError(404, "replay_miss", f"Replay miss: no recording in the cassette '{cassette}' matches this "
                                            f"request. The nearest recording differs at {shown}{more}.", param=param)
