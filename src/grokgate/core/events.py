"""What a provider yields while it generates: one vocabulary for every backend.

Providers translate their wire format into these events; a wire format of the serving layer turns them into
chat-completion chunks or a whole chat completion (core/completion.py, serving/chat.py). A provider reports
usage once, for the whole request (never a running sum), as its last event. A backend that reports none is
estimated from its text by the router (providers/router.py), so the client and the ledger see the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

# JSON as providers pass it through (logprobs, tool-call fragments, xAI's citations): what orjson reads and writes.
JSON: TypeAlias = "str | int | float | bool | list[JSON] | dict[str, JSON] | None"
JSONObject: TypeAlias = "dict[str, JSON]"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # includes reasoning tokens (OpenAI semantics)
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    # Server-side tool calls the backend ran (xAI's web search, X search, code execution...), priced per call.
    server_tool_calls: int = 0
    # Counted by grokgate from the text (the backend reported none): the ledger row is marked estimated.
    estimated: bool = False
    # What the upstream itself says the request cost it, where it says so: xAI's `usage.cost_in_usd_ticks` (1 USD =
    # 1e10 ticks). Kept beside grokgate's own price on the ledger (drift reports); None: not reported.
    cost_in_usd_ticks: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }


@dataclass(slots=True)
class Delta:
    """New output for one choice."""

    index: int
    content: str | None = None
    logprobs: list[JSONObject] | None = None
    tool_calls: list[JSONObject] | None = None
    reasoning_content: str | None = None


@dataclass(slots=True)
class Finish:
    """One choice is complete; exactly one per choice index."""

    index: int
    reason: str


# Where a generation's answer comes from, which decides how it is billed (core/billing.py): a backend generating it
# now, the exact response cache (serving/response_cache.py), or a recorded exchange (providers/recording.py). A
# field of the generation, never read off a backend's name.
Origin = Literal["live", "cache", "replay"]


@dataclass(slots=True)
class UsageReport:
    usage: Usage = field(default_factory=Usage)


@dataclass(slots=True)
class Extra:
    """Top-level response keys a backend adds and clients may want (xAI's `citations`), passed through."""

    fields: JSONObject


@dataclass(slots=True)
class Item:
    """A whole output item of the Responses API that grokgate passes through as the backend sent it: xAI's
    reasoning items (with their encrypted content) and server-side tool calls (`web_search_call`,
    `x_search_call`, `code_interpreter_call`...). Only a backend called through the Responses API yields it; the
    chat wire format ignores it (core/completion.py)."""

    index: int  # the choice
    item: JSONObject


Event = Delta | Finish | UsageReport | Extra | Item
