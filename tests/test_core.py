"""The pure domain: usage arithmetic, prices, credits, the breaker, the fair queue, chunk assembly, xAI rules."""

from __future__ import annotations

import threading

import pytest

from grokgate.core.accounts import format_credits, parse_credits
from grokgate.core.breaker import Breaker
from grokgate.core.completion import ChunkFactory, CompletionAccumulator, StreamAssembler
from grokgate.core.errors import GatewayError
from grokgate.core.events import Delta, Extra, Finish, Usage, UsageReport
from grokgate.core.fairqueue import FairQueue
from grokgate.core.pricing import Price, cost_of, estimate_prompt_tokens, max_cost
from grokgate.core.usage import normalise_usage
from grokgate.providers.xai import is_reasoning_model, translate

# -- usage -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "completion", "reasoning", "total"),
                         [(32, 9, 94, 135), (213, 27, 133, 373), (390, 26, 126, 542), (10, 1328, 307, 1645)])
def test_xai_usage_arithmetic_is_normalised(prompt: int, completion: int, reasoning: int, total: int) -> None:
    """Recorded xAI responses: total = prompt + completion + reasoning."""
    usage = normalise_usage({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total,
                             "completion_tokens_details": {"reasoning_tokens": reasoning}})
    assert usage.completion_tokens == completion + reasoning
    assert usage.reasoning_tokens == reasoning
    assert usage.total_tokens == total


def test_openai_usage_arithmetic_is_kept() -> None:
    usage = normalise_usage({"prompt_tokens": 10, "completion_tokens": 50, "total_tokens": 60,
                             "completion_tokens_details": {"reasoning_tokens": 30},
                             "prompt_tokens_details": {"cached_tokens": 4}})
    assert (usage.completion_tokens, usage.reasoning_tokens, usage.cached_tokens) == (50, 30, 4)


def test_usage_tolerates_junk() -> None:
    usage = normalise_usage({"prompt_tokens": "x", "completion_tokens": -5, "prompt_tokens_details": None,
                             "completion_tokens_details": {"reasoning_tokens": None}})
    assert usage == Usage()
    assert normalise_usage({"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 9}}).cached_tokens == 3


# -- prices and credits --------------------------------------------------------------------------------------------

PRICE = Price("grok-3", input=3_000_000, cached_input=750_000, output=15_000_000, version=2)


def test_cost_prices_each_token_class_once_rounding_up() -> None:
    cost = cost_of(Usage(prompt_tokens=1000, cached_tokens=400, completion_tokens=7, reasoning_tokens=5), PRICE)
    assert cost.input == 600 * 3          # uncached prompt only
    assert cost.cached_input == 400 * 3 // 4
    assert cost.output == 7 * 15          # reasoning is inside completion: charged once, at the output rate
    assert cost_of(Usage(prompt_tokens=1), Price("m", 1, 0, 0)).total == 1, "a fraction rounds up"
    assert cost_of(Usage(), PRICE).total == 0


def test_max_cost_covers_every_choice() -> None:
    assert max_cost(100, 3, 50, PRICE) == 100 * 3 + 150 * 15
    assert estimate_prompt_tokens(0) >= 64


def test_prices_must_be_non_negative_integers() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="price"):
            Price("m", bad, 0, 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "micro"),
                         [("1", 1_000_000), ("0.5", 500_000), ("2.000001", 2_000_001), (3, 3_000_000)])
def test_parse_credits(text: str, micro: int) -> None:
    assert parse_credits(text) == micro
    assert parse_credits(format_credits(micro)) == micro


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "1.0000001", "NaN", "inf", ""])
def test_parse_credits_refuses(bad: str) -> None:
    with pytest.raises(GatewayError) as err:
        parse_credits(bad)
    assert err.value.param == "amount"


# -- breaker -------------------------------------------------------------------------------------------------------


def test_breaker_opens_after_threshold_then_probes_once() -> None:
    now = [0.0]
    breaker = Breaker(threshold=2, cooldown=10, clock=lambda: now[0])
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 10.5
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow(), "one probe at a time"
    breaker.failure()
    assert breaker.state == "open"
    now[0] = 21
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


def test_breaker_honours_retry_after_and_recovers_from_a_lost_probe() -> None:
    now = [0.0]
    breaker = Breaker(threshold=5, cooldown=10, clock=lambda: now[0])
    breaker.failure(retry_after=3)
    assert not breaker.allow() and breaker.retry_in() == 3
    now[0] = 3.1
    assert breaker.allow()  # the probe's client went away: it never reports back
    now[0] = 14
    assert breaker.allow(), "a probe that never reported does not keep the breaker shut"


# -- fair queue ----------------------------------------------------------------------------------------------------


def test_fair_queue_serves_requests_round_robin() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.put_group("big", [f"b{i}" for i in range(4)])
    queue.put_group("small", ["s0"])
    queue.put_group("other", ["o0", "o1"])
    order = [queue.get() for _ in range(7)]
    assert order == ["b0", "s0", "o0", "b1", "o1", "b2", "b3"]
    assert len(queue) == 0


def test_fair_queue_discard_and_close() -> None:
    queue: FairQueue[int] = FairQueue()
    queue.put_group("a", [1, 2, 3])
    assert queue.get() == 1
    assert queue.discard("a") == [2, 3] and len(queue) == 0
    got: list[int | None] = []
    waiter = threading.Thread(target=lambda: got.append(queue.get()))
    waiter.start()
    queue.close()
    waiter.join(5)
    assert got == [None]


# -- chunk assembly ------------------------------------------------------------------------------------------------


def test_stream_assembler_keeps_the_invariants() -> None:
    assembler = StreamAssembler(ChunkFactory("grok-3", "fp", "chatcmpl-1", 7), choices=2, include_usage=True)
    chunks = assembler.opening()
    for event in (Delta(1, "a"), Finish(1, "end_turn"), Finish(1, "stop"), Delta(1, "late"), Delta(0, "b"),
                  Finish(0, "length"), Extra({"citations": ["u"]}), UsageReport(Usage(3, 4)), UsageReport(Usage(3, 5))):
        chunks.extend(assembler.on_event(event))
    chunks += assembler.closing()
    assert {c["id"] for c in chunks} == {"chatcmpl-1"} and {c["created"] for c in chunks} == {7}
    finishes = [(ch["index"], ch["finish_reason"]) for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finishes == [(1, "stop"), (0, "length")], "end_turn -> stop; one finish per choice; none duplicated"
    assert chunks[-2]["citations"] == ["u"], "late top-level keys ride on the held-back last finish chunk"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5, "last report wins"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert not any(ch["delta"].get("content") == "late" for c in chunks for ch in c["choices"])


def test_accumulator_merges_tool_call_fragments() -> None:
    acc = CompletionAccumulator(ChunkFactory("grok-4", "fp"), choices=1)
    acc.on_event(Delta(0, tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                       "function": {"name": "f", "arguments": '{"a":'}}]))
    acc.on_event(Delta(0, tool_calls=[{"index": 0, "function": {"arguments": " 1}"}}]))
    acc.on_event(Finish(0, "tool_calls"))
    message = acc.result()["choices"][0]["message"]
    assert message["content"] is None
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    assert message["tool_calls"] == [call]


# -- xAI request rules ----------------------------------------------------------------------------------------------


def test_reasoning_models() -> None:
    assert all(is_reasoning_model(m) for m in ("grok-4-0709", "grok-4-1-fast-reasoning", "grok-3-mini"))
    assert not any(is_reasoning_model(m) for m in ("grok-3", "grok-4-1-fast-non-reasoning", "grok-2-vision-1212"))


def test_translate_leaves_a_plain_request_alone() -> None:
    body = {"model": "grok-3", "messages": [{"role": "user", "content": "x"}], "temperature": 0.5, "stop": ["a"],
            "frequency_penalty": 1, "top_logprobs": 8, "logprobs": True}
    assert translate(dict(body), "grok-3") == body
