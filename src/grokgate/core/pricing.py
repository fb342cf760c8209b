"""Prices and costs, in integer micro-credits. No floats touch money.

A price is micro-credits per million tokens for each token class: input, cached input, output. Reasoning
tokens are priced as output; they are part of `completion_tokens` (OpenAI semantics), so they are charged
once. Cached tokens are part of `prompt_tokens`; they are charged at the cached rate instead of the input
rate, never both. Server-side tool calls (xAI's web search, X search, code execution through the Responses API)
are charged per call at one configured price (`server_tool_call_price`, in micro-credits per call), whatever the
model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from grokgate.core.events import Usage

MICRO = 1_000_000  # micro-credits per credit
PER = 1_000_000  # prices are per million tokens


@dataclass(frozen=True, slots=True)
class Price:
    model: str
    input: int  # micro-credits per million input tokens
    cached_input: int
    output: int
    version: int = 0

    def __post_init__(self) -> None:
        for name in ("input", "cached_input", "output"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} price must be a non-negative integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class Cost:
    input: int
    cached_input: int
    output: int
    server_tools: int = 0  # server-side tool calls x the price per call

    @property
    def total(self) -> int:
        return self.input + self.cached_input + self.output + self.server_tools


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cost_of(usage: Usage, price: Price, *, tool_call_price: int = 0) -> Cost:
    """What a request costs, rounded up to the micro-credit per class; `tool_call_price` is what one server-side
    tool call costs (micro-credits, an integer: no rounding)."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    fresh = usage.prompt_tokens - cached
    return Cost(
        input=_ceil_div(fresh * price.input, PER),
        cached_input=_ceil_div(cached * price.cached_input, PER),
        output=_ceil_div(usage.completion_tokens * price.output, PER),
        server_tools=max(0, usage.server_tool_calls) * tool_call_price,
    )


HitPrice = Literal["cached_input", "input", "full", "free"]  # settings.response_cache_hit_price


def cache_hit_cost(usage: Usage, price: Price, mode: HitPrice, *, tool_call_price: int = 0) -> Cost:
    """What an answer replayed from the exact response cache costs (core/response_cache.py), by the operator's
    mode (settings.response_cache_hit_price): `cached_input` (the default) bills the whole prompt at the cached
    input price and no output, `input` the prompt as if sent (its cached share at the cached price) and no
    output, `full` the answer as if it were generated again, `free` nothing. Never more than `cost_of` of the same
    usage, so never more than the request's reservation (an entry with more output than it reserved is a miss:
    serving/response_cache.py)."""
    if mode == "full":
        return cost_of(usage, price, tool_call_price=tool_call_price)
    if mode == "free":
        return Cost(0, 0, 0)
    if mode == "input":
        return cost_of(Usage(prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens), price)
    if mode == "cached_input":
        return Cost(0, _ceil_div(usage.prompt_tokens * min(price.cached_input, price.input), PER), 0)
    raise ValueError(f"unknown cache hit price mode {mode!r}")


def max_cost(prompt_tokens: int, choices: int, output_limit: int, price: Price, *, server_tool_calls: int = 0,
             tool_call_price: int = 0) -> int:
    """The most a request can cost: every prompt token uncached, every choice at its output limit, and every
    server-side tool call it may run (`server_tool_calls`, the bound sent upstream as `max_tool_calls`).
    `cost_of` of any usage within these bounds is at most this (each class is monotonic in its count)."""
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=choices * output_limit,
                  server_tool_calls=server_tool_calls)
    return cost_of(usage, price, tool_call_price=tool_call_price).total


def beyond_output_cap(completion_tokens: int, output_limit: int | None, choices: int) -> bool:
    """Whether a stored answer (a cassette's, a cache entry's) has more output than a request held to
    `output_limit` per choice could produce, so more than its reservation paid for: it was made without that cap."""
    return output_limit is not None and completion_tokens > output_limit * max(choices, 1)


def usd_per_mtok_to_micro(usd: float, credits_per_usd: float) -> int:
    """Convert a reference USD price per million tokens into micro-credits per million tokens."""
    return round(usd * credits_per_usd * MICRO)


# Reference prices from the contract (USD per million tokens: input, output). Cached input defaults to a
# quarter of input. grok-2-vision and the non-reasoning fast model follow their family.
REFERENCE_USD = {
    "grok-4": (3.00, 15.00),
    "grok-3": (3.00, 15.00),
    "grok-4-1-fast": (0.20, 0.50),
    "grok-4-1-fast-non-reasoning": (0.20, 0.50),
    "grok-3-mini": (0.30, 0.50),
    "grok-2-vision": (2.00, 10.00),
}


def default_prices(models: list[str], credits_per_usd: float) -> list[Price]:
    prices = []
    for model in models:
        usd_in, usd_out = REFERENCE_USD.get(model, (3.00, 15.00))
        prices.append(
            Price(
                model=model,
                input=usd_per_mtok_to_micro(usd_in, credits_per_usd),
                cached_input=usd_per_mtok_to_micro(usd_in / 4, credits_per_usd),
                output=usd_per_mtok_to_micro(usd_out, credits_per_usd),
            )
        )
    return prices


def estimate_prompt_tokens(chars: int) -> int:
    """A rough prompt estimate from characters of message text (2 per token, plus 64 for a chat template):
    what the local engine uses for a prompt cut short before llama.cpp counted it. Reservations use
    `prompt_token_bound` instead, which covers everything that reaches the model."""
    return chars // 2 + 64


# -- What a request can cost, and what it is billed when the backend says nothing ------------------------------------
#
# The bound: byte-level BPE tokenizers (Qwen's, Grok's) emit at most one token per byte of the text they are
# given, and the text a model receives is the request body minus its JSON syntax, plus what the chat template
# adds. Decoding JSON never makes text longer (escapes only shrink), so the body's size in bytes bounds every
# message, name and tool-call argument. Tools, JSON schemas and tool-call arguments are re-serialised by the
# template (`tojson` in transformers' and llama.cpp's renderers writes Python's ", " and ": " separators), which can
# be longer than a compact body: one byte more per comma or colon in the body covers that. An image's tokens do
# not depend on its URL or its bytes, so an image costs IMAGE_TOKENS in place of its URL. Not covered: templates
# that pretty-print (`tojson(indent=...)`) or \u-escape non-ASCII text, and prompt text an upstream adds itself
# (xAI Live Search sources); the settlement reports any cost above the reservation (see core/billing.py).

TEMPLATE_TOKENS = 256  # a template's own system prompt and tool preamble (Qwen2.5's tool preamble is ~150)
MESSAGE_TOKENS = 16  # role and turn markers per message (Qwen's are 5)
TOOL_CALL_TOKENS = 32  # the framing a template wraps each assistant tool call in (<tool_call>{"name": ...})
# An image part, whatever its size or URL: vision models bill an image by the tiles it is resized into, a
# bounded number (OpenAI's high detail tops out near 1,100 tokens; xAI's image guide describes 448-px tiles of
# 256 tokens, under 2,000 in all); 4,096 leaves room for other vision upstreams.
IMAGE_TOKENS = 4096
# Estimates when a backend reports no usage: one token per 3 bytes of UTF-8 text. English averages about 4
# characters per token and code about 3; a CJK character is 3 bytes and about one token.
BYTES_PER_TOKEN = 3


class PromptShape(NamedTuple):
    """What the prompt is made of beyond its bytes (counted from the parsed request). A NamedTuple: built once
    per request, and a frozen dataclass costs over a microsecond to build."""

    messages: int = 0
    tool_calls: int = 0  # assistant tool calls in the history
    images: int = 0
    image_url_bytes: int = 0  # the URLs' share of the body (data: URLs are large), replaced by IMAGE_TOKENS


def _framing(shape: PromptShape) -> int:
    return shape.messages * MESSAGE_TOKENS + shape.tool_calls * TOOL_CALL_TOKENS + shape.images * IMAGE_TOKENS


def prompt_token_bound(body: bytes, shape: PromptShape) -> int:
    """At most how many prompt tokens a request whose raw JSON body is `body` can be billed (see above)."""
    text = max(0, len(body) - shape.image_url_bytes) + body.count(b",") + body.count(b":")
    return text + _framing(shape) + TEMPLATE_TOKENS


def estimate_output_tokens(text_bytes: int) -> int:
    """Tokens billed for `text_bytes` bytes of UTF-8 output (or prompt text) when the backend counted none."""
    return _ceil_div(max(0, text_bytes), BYTES_PER_TOKEN)


def estimate_prompt(text_bytes: int, shape: PromptShape) -> int:
    """The prompt billed when the backend counted none: its text by the bytes rule, plus framing and images.
    Never above `prompt_token_bound` of the same request, so it never exceeds the reservation."""
    return estimate_output_tokens(text_bytes) + _framing(shape)


def utf8_len(text: str) -> int:
    """Bytes of `text` in UTF-8, without encoding it when it is ASCII (`isascii` is O(1) in CPython)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
