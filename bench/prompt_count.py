"""What counting a prompt before admission costs (providers/local_count.py): the embedded engine in this process,
`LocalEngine.count_prompt` timed for prompts of several sizes, one at a time and 64 at once (as a burst of
requests admits them), against the body's bound it replaces.

    .venv/bin/python bench/prompt_count.py [--rounds 200] [--model PATH]

Without --model it uses the catalog model from the user's cache (`grokgate model` puts it there). Prints, per
prompt: its body bound and its counted tokens, the median and p99 of one count (ms), and the time for 64 counts
started together (the last one's wait: they share one listener thread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from grokgate.core.pricing import prompt_token_bound
from grokgate.providers.base import Call
from grokgate.providers.local import LocalEngine
from grokgate.providers.model_files import DEFAULT_MODEL
from grokgate.providers.router import prompt_shape
from grokgate.schemas.chat import ChatCompletionRequest

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PROSE = "The quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches. "


def bodies() -> dict[str, dict[str, object]]:
    def user(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    return {
        "tiny ('hi')": {"model": "grok-3", "max_tokens": 1, "messages": user("hi")},
        "tools, 1 tool": {"model": "grok-3", "max_tokens": 8, "tools": [WEATHER], "messages": user("Weather?")},
        "1 KiB": {"model": "grok-3", "max_tokens": 8, "messages": user(PROSE * 11)},
        "3.7 KiB (near the limit)": {"model": "grok-3", "max_tokens": 8, "messages": user(PROSE * 38)},
        "15 KiB (not counted)": {"model": "grok-3", "max_tokens": 8, "messages": user(PROSE * 160)},
    }


def call_of(body: dict[str, object]) -> Call:
    raw = json.dumps(body, separators=(",", ":")).encode()
    request = ChatCompletionRequest.model_validate_json(raw)
    return Call(request, "bench", prompt_tokens=prompt_token_bound(raw, prompt_shape(request)))


async def main(rounds: int, model: Path) -> None:
    engine = LocalEngine(model_path=model, cache_dir=Path("/nonexistent"), slots=4, ctx_per_slot=4096,
                         prompt_cache_ram_mib=0)
    await engine.start()
    while not engine.ready():
        if engine.status()["error"]:
            raise SystemExit(engine.status()["error"])
        await asyncio.sleep(0.1)
    print(f"{'prompt':26} {'bound':>6} {'counted':>7} {'one: p50 ms':>11} {'p99 ms':>7} {'64 at once: ms':>14} "
          f"{'given up':>8}")
    for name, body in bodies().items():
        call = call_of(body)
        counted = await engine.count_prompt(call, "grok-3")
        if counted is None:  # past the limit (or the listener failed): the body's bound stays
            print(f"{name:26} {call.prompt_tokens:>6} {'-':>7}   not counted: the body's bound is reserved")
            continue
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            await engine.count_prompt(call, "grok-3")
            times.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        burst = await asyncio.gather(*(engine.count_prompt(call, "grok-3") for _ in range(64)))
        together = (time.perf_counter() - start) * 1000
        assert all(c in (counted, None) for c in burst), burst
        given_up = sum(c is None for c in burst)
        times.sort()
        print(f"{name:26} {call.prompt_tokens:>6} {counted!s:>7} {statistics.median(times):>11.2f} "
              f"{times[int(len(times) * 0.99) - 1]:>7.2f} {together:>14.1f} {given_up:>8}")
    await engine.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--model", type=Path,
                        default=Path.home() / ".cache" / "grokgate" / "models" / DEFAULT_MODEL.filename)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.model))
