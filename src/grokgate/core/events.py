"""What a provider yields while it generates: one vocabulary for every backend.

Providers translate their wire format into these events; the API layer turns them into chat-completion
chunks or a whole chat completion. A provider reports usage once, for the whole request (never a running
sum), as its last event. A backend that reports none is estimated from its text by the router
(providers/router.py), so the client and the ledger see the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0  # includes reasoning tokens (OpenAI semantics)
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    # Counted by grokgate from the text (the backend reported none): the ledger row is marked estimated.
    estimated: bool = False

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
    logprobs: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None


@dataclass(slots=True)
class Finish:
    """One choice is complete; exactly one per choice index."""

    index: int
    reason: str


@dataclass(slots=True)
class UsageReport:
    usage: Usage = field(default_factory=Usage)


@dataclass(slots=True)
class Extra:
    """Top-level response keys a backend adds and clients may want (xAI's `citations`), passed through."""

    fields: dict[str, Any]


Event = Delta | Finish | UsageReport | Extra
