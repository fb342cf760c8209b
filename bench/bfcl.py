"""Function calling on the Berkeley Function Calling Leaderboard (BFCL): grokgate's local engine beside llama.cpp's own.

A fixed, seeded sample of BFCL's single-turn categories (simple, multiple, parallel, parallel_multiple, irrelevance,
live_simple; `--per-category` items each, default 40), scored by BFCL's own AST checker, through:
- `grokgate`: `/v1/chat/completions` over HTTP with the openai SDK, as a user sends it: `tool_choice` "auto" (or
  `--tool-choice required`), max_tokens 256, no temperature (the server's default) unless `--temperature`. The
  bench starts its own `grokgate serve` from this checkout on a free port (a temporary data dir, accounts off,
  GROKGATE_API_KEYS for auth; `--model qwen2.5-coder-1.5b` for the larger catalog model), or uses `--url`.
- `peer`: llama.cpp's own tool calling on the same GGUF, in-process through xllamacpp: the request carries `tools`
  and llama.cpp renders them with the model's chat template (jinja) and parses its answer; no grokgate prompt,
  grammar or parser. Same engine settings as grokgate's (GROKGATE_THREADS, _SLOTS, _CTX_PER_SLOT or defaults).
  Scored strict (only the `tool_calls` llama.cpp parsed) and lenient (bare JSON `{"name": ..., "arguments": ...}`
  objects in its text counted as calls too).

As BFCL's OpenAI (function-calling) handler does: the question's messages as they are, no system prompt added; the
function docs through BFCL's `convert_to_tool(..., GORILLA_TO_OPENAPI, ModelStyle.OPENAI_COMPLETIONS)` (BFCL types
"dict", "float", "tuple", "any" to JSON Schema, dots in names replaced by "_"); the calls' names mapped back to
BFCL's dotted names before checking. An answer with no call is a hit on `irrelevance` and a miss elsewhere.
BFCL v4's files (BFCL_v4_<category>.json): "simple" is its `simple_python` (v3's "simple").

    .venv/bin/python bench/bfcl.py [--per-category 40] [--seed 0] [--systems grokgate,peer]
        [--categories simple,multiple,...] [--tool-choice auto|required] [--model qwen2.5-coder-1.5b]
        [--url http://127.0.0.1:8000 --api-key KEY] [--concurrency 4] [--out DIR]
    .venv/bin/python bench/bfcl.py --from-json DIR      # the tables again, from an earlier run's files

Prints a markdown table per system (hits/n and % per category, pooled over all items) and writes, under `--out`
(default a new temporary directory), `<system>.json`: {"meta": {...}, "items": [...]}, one item per question with
its `id`, `category`, `expected` (BFCL's possible answers), `answer` (tool_calls, content, finish_reason,
completion_tokens, error) and, per scoring (`strict`, and `lenient` for the peer), `hit`, `kind` (why it missed:
no call, no call cut at max_tokens, called on irrelevance, wrong name, extra calls, too few calls, wrong args,
bad JSON, error) and BFCL's own `error` / `error_type`.

BFCL itself: the `bfcl-eval` package pulls torch-sized dependencies (sentence-transformers, vllm extras, every
vendor SDK), so it is never installed with them. The bench imports its data loader and AST checker only, which
need these, installed without dependencies into a cache directory outside the venv (done on first run):

    python -m pip install --no-deps --target ~/.cache/grokgate-bench/bfcl-eval-2026.3.23 \\
        bfcl-eval==2026.3.23 filelock==3.20.0 tenacity==9.2.1 \\
        tree-sitter==0.21.3 tree-sitter-java==0.21.0 tree-sitter-javascript==0.21.4

(or `--bfcl-dir DIR` for another one). Its checker imports BFCL's model registry (every handler, every vendor SDK)
only to ask whether a model's names had their dots replaced; the bench stands that one module in with its answer.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import free_port, stop

ROOT = Path(__file__).resolve().parents[1]
BFCL_VERSION = "2026.3.23"
BFCL_PINS = (f"bfcl-eval=={BFCL_VERSION}", "filelock==3.20.0", "tenacity==9.2.1", "tree-sitter==0.21.3",
             "tree-sitter-java==0.21.0", "tree-sitter-javascript==0.21.4")
# Our category names -> BFCL v4's (its data file is BFCL_v4_<name>.json).
CATEGORIES = {"simple": "simple_python", "multiple": "multiple", "parallel": "parallel",
              "parallel_multiple": "parallel_multiple", "irrelevance": "irrelevance", "live_simple": "live_simple"}
CHECKER_MODEL = "grokgate-bench"  # the model name BFCL's checker is told (names already mapped back)
MAX_TOKENS = 256


# --- BFCL: locate, import, load --------------------------------------------------------------------------------

def bfcl_modules(target: Path) -> types.SimpleNamespace:
    """BFCL's loader, checker and tool conversion, installing them (no dependencies) into `target` if needed."""
    # BFCL makes result/score/lock folders next to its package on import: keep them out of site-packages.
    os.environ.setdefault("BFCL_PROJECT_ROOT", tempfile.mkdtemp(prefix="bfcl-project-"))
    registry = types.ModuleType("bfcl_eval.constants.model_config")
    registry.MODEL_CONFIG_MAPPING = {CHECKER_MODEL: types.SimpleNamespace(underscore_to_dot=False)}  # type: ignore[attr-defined]
    sys.modules["bfcl_eval.constants.model_config"] = registry
    try:
        import bfcl_eval  # noqa: F401
    except ImportError:
        if not (target / "bfcl_eval").is_dir():
            print(f"bfcl-eval not found: installing it without its dependencies into {target}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                            *BFCL_PINS], check=True)
        sys.path.insert(0, str(target))
    from importlib.metadata import version

    from bfcl_eval import utils
    from bfcl_eval.constants.enums import Language, ModelStyle
    from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker
    from bfcl_eval.model_handler.utils import convert_to_tool

    try:
        found = version("bfcl-eval")
    except Exception:
        found = "unknown"
    if found != BFCL_VERSION:
        print(f"warning: bfcl-eval {found} found, the figures were made with {BFCL_VERSION}", file=sys.stderr)
    return types.SimpleNamespace(
        load=utils.load_dataset_entry, truth=utils.load_ground_truth_entry, check=ast_checker,
        tools=lambda functions: convert_to_tool(functions, GORILLA_TO_OPENAPI, ModelStyle.OPENAI_COMPLETIONS),
        python=Language.PYTHON, version=found)


def sample(bfcl: types.SimpleNamespace, category: str, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` items of a category, the same ones on every run with the same seed (in the file's order)."""
    name = CATEGORIES[category]
    entries = bfcl.load(name)
    truths = {} if category == "irrelevance" else {t["id"]: t["ground_truth"] for t in bfcl.truth(name)}
    picked = sorted(random.Random(f"{seed}/{category}").sample(range(len(entries)), min(n, len(entries))))
    items = []
    for i in picked:
        entry = entries[i]
        tools = bfcl.tools(entry["function"])
        items.append({"id": entry["id"], "category": category, "bfcl_category": name,
                      "messages": entry["question"][0], "functions": entry["function"], "tools": tools,
                      "names": {t["function"]["name"]: f["name"] for t, f in zip(tools, entry["function"],
                                                                                 strict=True)},
                      "expected": truths.get(entry["id"])})
    return items


# --- Scoring ---------------------------------------------------------------------------------------------------

def bare_calls(text: str | None) -> list[tuple[str, Any]]:
    """JSON objects shaped like a call (`{"name": str, "arguments": object or JSON text}`) anywhere in a text."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    text = text or ""
    while (at := text.find("{", at)) >= 0:
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError:
            at += 1
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str) and "arguments" in value:
            calls.append((value["name"], value["arguments"]))
            at = end
        else:
            at += 1  # not a call itself: one may sit inside it
    return calls


def decode(calls: list[tuple[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    """Calls as BFCL's checker reads them, `[{name: {arg: value}}]`, with BFCL's own (dotted) names; raises
    ValueError when a call's arguments are not a JSON object."""
    out = []
    for name, arguments in calls:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
        if not isinstance(args, dict):
            raise ValueError(f"arguments of {name} are not a JSON object")
        out.append({names.get(name, name): args})
    return out


def score(bfcl: types.SimpleNamespace, item: dict[str, Any], answer: dict[str, Any], lenient: bool) -> dict[str, Any]:
    """hit, and for a miss its kind and BFCL's error."""
    if answer.get("error"):
        return {"hit": False, "kind": "error"}
    calls = [(c["name"], c["arguments"]) for c in answer["tool_calls"]]
    if lenient:
        calls += bare_calls(answer["content"])
    cut = answer["finish_reason"] == "length"
    try:
        decoded = decode(calls, item["names"])
    except ValueError as exc:
        return {"hit": False, "kind": "bad JSON" + (", cut at max_tokens" if cut else ""), "error": [str(exc)]}
    if item["category"] == "irrelevance":
        return {"hit": not decoded, "kind": None if not decoded else "called on irrelevance"}
    if not decoded:
        return {"hit": False, "kind": "no call, cut at max_tokens" if cut else "no call"}
    result = bfcl.check(item["functions"], decoded, item["expected"], bfcl.python, item["bfcl_category"],
                        CHECKER_MODEL)
    if result["valid"]:
        return {"hit": True, "kind": None, "decoded": decoded}
    error_type = result.get("error_type", "")
    if "wrong_count" in error_type:
        kind = "extra calls" if len(decoded) > len(item["expected"]) else "too few calls"
    elif not {next(iter(d)) for d in decoded} <= {next(iter(e)) for e in item["expected"]}:
        kind = "wrong name"  # a function the answer does not use (multiple: the wrong one of those offered)
    else:
        kind = "wrong args"  # BFCL's value, type, missing or unexpected parameter errors
    return {"hit": False, "kind": kind + (", cut at max_tokens" if cut else ""), "decoded": decoded,
            "error": result.get("error"), "error_type": error_type}


# --- Systems ---------------------------------------------------------------------------------------------------

def request_body(item: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": item["messages"], "tools": item["tools"], "tool_choice": args.tool_choice,
                            "max_tokens": MAX_TOKENS}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    return body


def ask_grokgate(client: openai.OpenAI, item: dict[str, Any], *, args: argparse.Namespace) -> dict[str, Any]:
    try:
        response = client.chat.completions.create(model=args.model_name, **request_body(item, args))
    except openai.APIStatusError as exc:
        return {"error": f"{exc.status_code}: {exc.message}"}
    choice = response.choices[0]
    calls = [{"name": c.function.name, "arguments": c.function.arguments}
             for c in choice.message.tool_calls or () if c.type == "function"]
    return {"tool_calls": calls, "content": choice.message.content, "finish_reason": choice.finish_reason,
            "completion_tokens": response.usage.completion_tokens if response.usage else None}


def ask_peer(server: Any, item: dict[str, Any], *, args: argparse.Namespace) -> dict[str, Any]:
    result = server.handle_chat_completions(request_body(item, args))
    if "choices" not in result:
        return {"error": json.dumps(result)[:500]}
    choice = result["choices"][0]
    message = choice.get("message") or {}
    calls = [{"name": c["function"]["name"], "arguments": c["function"].get("arguments", "")}
             for c in message.get("tool_calls") or ()]
    return {"tool_calls": calls, "content": message.get("content"), "finish_reason": choice.get("finish_reason"),
            "completion_tokens": (result.get("usage") or {}).get("completion_tokens")}


def start_grokgate(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    port, key = free_port(), "bench-" + secrets.token_urlsafe(16)
    env = {k: v for k, v in os.environ.items() if "XAI" not in k}  # the local engine, whatever the caller's keys
    env.update({"GROKGATE_API_KEYS": key, "GROKGATE_ACCOUNTS": "false", "GROKGATE_DATA_DIR": str(work / "data"),
                "GROKGATE_LOG_LEVEL": "WARNING", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                                               env.get("PYTHONPATH", "")])})
    command = [sys.executable, "-m", "grokgate", "serve", "--port", str(port), "--grpc-port", "0"]
    if args.model:
        command += ["--model", args.model]
    log = (work / "grokgate.log").open("wb")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a first run assembles the model file
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return proc, url, key
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop([proc])
            tail = (work / "grokgate.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"grokgate serve did not become ready:\n{tail}")
        time.sleep(0.5)


def start_peer(args: argparse.Namespace) -> Any:
    import xllamacpp

    from grokgate.providers.model_files import CATALOG, ensure_model
    from grokgate.settings import Settings

    settings = Settings()
    path = ensure_model(CATALOG[args.model or settings.local_model], settings.cache_dir)
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_parallel = settings.slots
    params.n_ctx = settings.slots * settings.ctx_per_slot
    params.cpuparams.n_threads = settings.threads
    params.cpuparams_batch.n_threads = settings.threads
    params.use_jinja = True  # the GGUF's own chat template renders `tools`, and llama.cpp parses its calls
    params.fit_params = False
    params.no_host = True  # no HTTP listener: only this process asks
    params.verbosity = -1
    return xllamacpp.Server(params)


def run_system(name: str, ask: Any, items: list[dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
    answers: list[dict[str, Any]] = []
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for done, answer in enumerate(pool.map(ask, items), 1):
            answers.append(answer)
            if done % 20 == 0 or done == len(items):
                print(f"  {name}: {done}/{len(items)} ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    return answers


# --- Report ----------------------------------------------------------------------------------------------------

def table(rows: list[tuple[str, list[dict[str, Any]]]], categories: list[str]) -> str:
    lines = ["| system | " + " | ".join(categories) + " | pooled |", "|---" * (len(categories) + 2) + "|"]
    for label, scored in rows:
        cells = []
        for category in categories:
            mine = [s for s in scored if s["category"] == category]
            hits = sum(s["hit"] for s in mine)
            cells.append(f"{hits}/{len(mine)} ({100 * hits / max(len(mine), 1):.0f}%)")
        hits = sum(s["hit"] for s in scored)
        cells.append(f"{hits}/{len(scored)} ({100 * hits / max(len(scored), 1):.1f}%)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def misses(rows: list[tuple[str, list[dict[str, Any]]]], categories: list[str]) -> str:
    lines = []
    for label, scored in rows:
        lines.append(f"misses, {label}:")
        for category in categories:
            kinds = Counter(s["kind"] for s in scored if s["category"] == category and not s["hit"])
            if kinds:
                lines.append(f"  {category}: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-category", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", default="grokgate,peer")
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    ap.add_argument("--tool-choice", choices=("auto", "required"), default="auto")
    ap.add_argument("--temperature", type=float, help="default: not sent (the server's default)")
    ap.add_argument("--model", help="catalog model for both systems (qwen2.5-coder-1.5b; default: grokgate's)")
    ap.add_argument("--model-name", default="grok-4", help="the `model` grokgate is asked for")
    ap.add_argument("--url", help="a running grokgate (with --api-key) instead of starting one")
    ap.add_argument("--api-key", default=os.environ.get("GROKGATE_BENCH_API_KEY", ""))
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", type=Path, help="per-item results (default: a new temporary directory)")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    ap.add_argument("--bfcl-dir", type=Path, default=cache / "grokgate-bench" / f"bfcl-eval-{BFCL_VERSION}",
                    help="where bfcl-eval is installed without its dependencies when not importable")
    ap.add_argument("--from-json", type=Path, metavar="DIR", help="print the tables of an earlier run's --out DIR")
    args = ap.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    categories = [c for c in args.categories.split(",") if c]
    unknown = [s for s in systems if s not in ("grokgate", "peer")] + [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise SystemExit(f"unknown system or category: {', '.join(unknown)}")
    if args.from_json:
        return report_saved(args.from_json, systems)
    out = args.out or Path(tempfile.mkdtemp(prefix="grokgate-bfcl-"))
    out.mkdir(parents=True, exist_ok=True)

    bfcl = bfcl_modules(args.bfcl_dir)
    items = [item for c in categories for item in sample(bfcl, c, args.per_category, args.seed)]
    meta = {"bfcl_eval": bfcl.version, "per_category": args.per_category, "seed": args.seed,
            "tool_choice": args.tool_choice, "temperature": args.temperature, "max_tokens": MAX_TOKENS,
            "model": args.model or "default", "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:]}
    rows: list[tuple[str, list[dict[str, Any]]]] = []
    for system in systems:
        if system == "grokgate":
            proc = None
            if args.url:
                url, key = args.url.rstrip("/"), args.api_key
            else:
                proc, url, key = start_grokgate(args, Path(tempfile.mkdtemp(prefix="grokgate-bfcl-serve-")))
            try:
                client = openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=600, max_retries=0)
                ask = functools.partial(ask_grokgate, client, args=args)
                answers = run_system(system, ask, items, args.concurrency)
            finally:
                if proc is not None:
                    stop([proc])
            scorings = ["strict"]
        else:
            server = start_peer(args)
            answers = run_system(system, functools.partial(ask_peer, server, args=args), items, args.concurrency)
            del server
            scorings = ["strict", "lenient"]
        records = []
        for item, answer in zip(items, answers, strict=True):
            scores = {s: score(bfcl, item, answer, lenient=s == "lenient") for s in scorings}
            records.append({"id": item["id"], "category": item["category"], "expected": item["expected"],
                            "answer": answer, **scores})
        (out / f"{system}.json").write_text(json.dumps({"meta": {**meta, "system": system}, "items": records},
                                                       indent=1, ensure_ascii=False, default=str))
        rows += rows_of(system, records)
    print_report(meta, rows, categories, out)


def rows_of(system: str, records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    scorings = [s for s in ("strict", "lenient") if records and s in records[0]]
    return [(system if len(scorings) == 1 else f"{system} ({s})", [{"category": r["category"], **r[s]}
                                                                   for r in records]) for s in scorings]


def print_report(meta: dict[str, Any], rows: list[tuple[str, list[dict[str, Any]]]], categories: list[str],
                 out: Path) -> None:
    print(f"BFCL ({meta['date']}, bfcl-eval {meta['bfcl_eval']}): {meta['per_category']} per category, seed "
          f"{meta['seed']}, tool_choice {meta['tool_choice']}, max_tokens {meta['max_tokens']}, temperature "
          f"{meta['temperature'] if meta['temperature'] is not None else 'default'}, model {meta['model']}\n")
    print(table(rows, categories))
    print("\n" + misses(rows, categories))
    print(f"\nper-item results: {out}/<system>.json")


def report_saved(directory: Path, systems: list[str]) -> None:
    """The tables of an earlier run, from its per-item files (no model, no BFCL needed)."""
    rows, meta = [], None
    for system in systems:
        path = directory / f"{system}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            meta = meta or saved["meta"]
            rows += rows_of(system, saved["items"])
    if meta is None:
        raise SystemExit(f"no {' or '.join(f'{s}.json' for s in systems)} in {directory}")
    present = {r["category"] for _, scored in rows for r in scored}
    print_report(meta, rows, [c for c in CATEGORIES if c in present], directory)

if __name__ == "__main__":
    main()
