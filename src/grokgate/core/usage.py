"""Upstream usage objects -> one `Usage` with OpenAI semantics: the last usage object, never a sum; cached and
reasoning tokens counted once each.

OpenAI: `completion_tokens` includes reasoning, total = prompt + completion. xAI: `completion_tokens`
excludes reasoning, total = prompt + completion + reasoning. The arithmetic of the object itself says which
convention it follows, so no per-provider flag can be forgotten. Cached tokens are a subset of the prompt.
"""

from __future__ import annotations

from typing import Any

from grokgate.core.events import Usage


def _int(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def _ticks(raw: dict[str, Any]) -> int | None:
    """xAI's own cost of the request (`cost_in_usd_ticks`, an integer), when it reports one."""
    value = raw.get("cost_in_usd_ticks")
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return int(value)


def normalise_usage(raw: dict[str, Any]) -> Usage:
    prompt = _int(raw.get("prompt_tokens"))
    completion = _int(raw.get("completion_tokens"))
    total = _int(raw.get("total_tokens"))
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    reasoning = _int(completion_details.get("reasoning_tokens"))
    cached = min(_int(prompt_details.get("cached_tokens")), prompt)
    if reasoning and total == prompt + completion + reasoning:
        completion += reasoning  # xAI arithmetic: reasoning was outside completion_tokens
    reasoning = min(reasoning, completion)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, reasoning_tokens=reasoning,
                 cost_in_usd_ticks=_ticks(raw))


def normalise_responses_usage(raw: dict[str, Any]) -> Usage:
    """A Responses API usage object (xAI's /v1/responses): `input_tokens` includes the cached ones,
    `output_tokens` includes reasoning (OpenAI semantics, and xAI's on this endpoint: total = input + output);
    should an object add reasoning outside `output_tokens` (total = input + output + reasoning), it is added in,
    as for chat. Server-side tool calls: xAI's billable count is `server_side_tool_usage_details` (successful
    calls per kind); `num_server_side_tools_used` (every attempt) is the figure when the details are absent."""
    prompt = _int(raw.get("input_tokens"))
    completion = _int(raw.get("output_tokens"))
    total = _int(raw.get("total_tokens"))
    input_details = raw.get("input_tokens_details") or {}
    output_details = raw.get("output_tokens_details") or {}
    reasoning = _int(output_details.get("reasoning_tokens")) if isinstance(output_details, dict) else 0
    cached = min(_int(input_details.get("cached_tokens")), prompt) if isinstance(input_details, dict) else 0
    if reasoning and total == prompt + completion + reasoning:
        completion += reasoning
    reasoning = min(reasoning, completion)
    details = raw.get("server_side_tool_usage_details")
    if isinstance(details, dict) and details:
        tools = sum(_int(v) for v in details.values())
    else:
        tools = _int(raw.get("num_server_side_tools_used"))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached, reasoning_tokens=reasoning,
                 server_tool_calls=tools, cost_in_usd_ticks=_ticks(raw))
