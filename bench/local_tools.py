"""Tool-call decoding vs free text on the embedded engine: time per output token (target: <= 1.5x).

Runs the engine in-process (xllamacpp, the catalog model from the cache), the same requests grokgate sends
(providers/local.py `_payload`, providers/local_tools.py grammar), one at a time, and prints a table.

    .venv/bin/python bench/local_tools.py [--runs 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from grokgate.providers.base import Call
from grokgate.providers.local import LocalEngine, _payload
from grokgate.providers.model_files import DEFAULT_MODEL
from grokgate.schemas.chat import ChatCompletionRequest

TOOL = {"type": "function", "function": {
    "name": "forecast", "description": "A weather forecast.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "fields": {"type": "array", "items": {"type": "string", "enum": ["temp", "rain", "wind"]},
                   "minItems": 1, "maxItems": 3}},
        "required": ["city", "unit", "days", "fields"], "additionalProperties": False}}}


def per_token(engine: LocalEngine, body: dict[str, Any]) -> tuple[float, int]:
    payload = _payload(Call(ChatCompletionRequest.model_validate(body), "key:bench"), "local")
    payload["stream"] = False
    started = time.perf_counter()
    result = engine._server.handle_chat_completions(payload)
    elapsed = time.perf_counter() - started
    timings = result.get("timings") or {}
    tokens = int(result["usage"]["completion_tokens"])
    # llama.cpp's own decode time per token when it reports it; else the wall time (prompt included).
    ms = float(timings["predicted_per_token_ms"]) if "predicted_per_token_ms" in timings else elapsed * 1000 / tokens
    return ms, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cache = Path.home() / ".cache" / "grokgate"
    engine = LocalEngine(model_path=cache / "models" / DEFAULT_MODEL.filename, cache_dir=cache,
                         threads=args.threads, slots=1, ctx_per_slot=2048)
    engine._load()
    ask = [{"role": "user", "content": "Forecast for Paris, three days, temperature and rain."}]
    cases = {
        "free text": {"model": "grok-3", "messages": ask, "max_tokens": 48, "seed": 1},
        "tool call (required)": {"model": "grok-3", "messages": ask, "max_tokens": 48, "seed": 1,
                                 "tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False},
        "tool call (auto)": {"model": "grok-3", "messages": ask, "max_tokens": 48, "seed": 1,
                             "tools": [TOOL], "tool_choice": "auto", "parallel_tool_calls": False},
    }
    rows = []
    for name, body in cases.items():
        per_token(engine, body)  # warm-up
        samples = [per_token(engine, {**body, "seed": i}) for i in range(args.runs)]
        rows.append((name, statistics.median(s[0] for s in samples), statistics.mean(s[1] for s in samples)))
    base = rows[0][1]
    print(f"{'case':<24}{'ms/token':>10}{'tokens':>8}{'vs text':>9}")
    for name, ms, tokens in rows:
        print(f"{name:<24}{ms:>10.2f}{tokens:>8.1f}{ms / base:>8.2f}x")
    asyncio.run(engine.close())


if __name__ == "__main__":
    main()
