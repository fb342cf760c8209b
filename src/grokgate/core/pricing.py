"""Prices and costs, in integer micro-credits. No floats touch money.

A price is micro-credits per million tokens for each token class: input, cached input, output. Reasoning
tokens are priced as output; they are part of `completion_tokens` (OpenAI semantics), so they are charged
once. Cached tokens are part of `prompt_tokens`; they are charged at the cached rate instead of the input
rate, never both.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def total(self) -> int:
        return self.input + self.cached_input + self.output


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cost_of(usage: Usage, price: Price) -> Cost:
    """What a request costs, rounded up to the micro-credit per class."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    fresh = usage.prompt_tokens - cached
    return Cost(
        input=_ceil_div(fresh * price.input, PER),
        cached_input=_ceil_div(cached * price.cached_input, PER),
        output=_ceil_div(usage.completion_tokens * price.output, PER),
    )


def max_cost(prompt_tokens: int, choices: int, output_limit: int, price: Price) -> int:
    """The most a request can cost: every prompt token uncached, every choice at its output limit."""
    return cost_of(Usage(prompt_tokens=prompt_tokens, completion_tokens=choices * output_limit), price).total


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
    """A deliberately high estimate for reservations: 2 characters per token (real text averages 3-4), plus
    room for a chat template's own system prompt and framing (Qwen's adds about 30 tokens)."""
    return chars // 2 + 64
