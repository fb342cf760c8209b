"""xAI's own cost figure beside grokgate's price: `usage.cost_in_usd_ticks` (1 USD = 1e10 ticks, on every chat and
Responses answer) is kept on the ledger row, summed per day with what grokgate charged for the same requests, and
`grokgate usage` shows the drift. A cached or replayed answer cost the upstream nothing now: it carries no figure.

In-process tier (tests/inproc.py): a scripted backend that reports the figure as the upstream would.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from grokgate.cli import main as cli_main
from grokgate.cli_admin import upstream_drift
from grokgate.core.events import Delta, Event, Finish, Usage, UsageReport
from grokgate.core.usage import normalise_responses_usage, normalise_usage
from grokgate.providers.openai_compat import merge_choices
from grokgate.schemas.chat import ChatCompletionRequest
from tests.conftest import TOKEN, create_key, user
from tests.inproc import PROMPT_TOKENS, ScriptedProvider, app_server, scripted_models

TICKS = 37_756_000  # xAI's documented example: $0.0038
ROUTING = """
backends: {local: {kind: local}}
models:
  grok-3: [{backend: local}]
cache:
  grok-3: {ttl: 600}
"""


def test_the_figure_is_read_from_both_apis_usage() -> None:
    chat = normalise_usage({"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                            "cost_in_usd_ticks": TICKS})
    responses = normalise_responses_usage({"input_tokens": 10, "output_tokens": 2, "total_tokens": 12,
                                           "cost_in_usd_ticks": TICKS})
    assert chat.cost_in_usd_ticks == responses.cost_in_usd_ticks == TICKS
    for absent in ({}, {"cost_in_usd_ticks": None}, {"cost_in_usd_ticks": "1"}, {"cost_in_usd_ticks": -5},
                   {"cost_in_usd_ticks": True}):
        assert normalise_usage({"prompt_tokens": 1, **absent}).cost_in_usd_ticks is None, absent


def test_n_single_requests_add_up_their_figures_or_report_none() -> None:
    async def one(ticks: int | None) -> AsyncGenerator[Event]:
        yield Delta(0, content="x")
        yield Finish(0, "stop")
        yield UsageReport(Usage(prompt_tokens=3, completion_tokens=1, cost_in_usd_ticks=ticks))

    async def merged(*ticks: int | None) -> int | None:
        last = None
        async for event in merge_choices([one(t) for t in ticks]):
            if isinstance(event, UsageReport):
                last = event.usage
        assert last is not None
        return last.cost_in_usd_ticks

    assert asyncio.run(merged(100, 250)) == 350
    assert asyncio.run(merged(100, None)) is None  # a sum missing a part would understate the upstream's cost
    assert asyncio.run(merged(None, 100)) is None


def test_the_ledger_the_daily_totals_and_the_cli_show_the_drift(tmp_path: Path) -> None:
    provider = ScriptedProvider(text="four words of answer")

    async def priced(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
        async for event in provider.say(provider.calls[-1], model):
            if isinstance(event, UsageReport):
                event = UsageReport(Usage(prompt_tokens=PROMPT_TOKENS, completion_tokens=4, cost_in_usd_ticks=TICKS))
            yield event

    provider.script = priced
    routing = tmp_path / "routing.yaml"
    routing.write_text(ROUTING)
    body = {"model": "grok-3", "messages": user("What is 2+2?"), "temperature": 0, "max_tokens": 8}
    with app_server(tmp_path, scripted_models(provider), config=routing) as srv:
        secret, key = create_key(srv, "payer", credits="10")  # type: ignore[arg-type]
        first = srv.chat(body, token=secret)
        second = srv.chat(body, token=secret)
        assert [first.headers["x-grokgate-cache"], second.headers["x-grokgate-cache"]] == ["miss", "hit"]
        with srv.client() as c:
            rows = c.get(f"/admin/ledger?token={key['id']}", headers={"Authorization": f"Bearer {TOKEN}"}).json()
            usage = c.get("/v1/usage?group_by=model", headers={"Authorization": f"Bearer {secret}"}).json()
        used = {r["backend"]: r for r in rows["data"] if r["kind"] == "usage"}
        assert used["scripted"]["upstream_cost_ticks"] == TICKS
        assert used["cache"]["upstream_cost_ticks"] is None  # the hit cost the upstream nothing
        [day] = usage["data"]
        charged = used["scripted"]["cost"]
        assert (day["requests"], day["upstream_requests"], day["upstream_cost_ticks"], day["upstream_charged"]) == (
            2, 1, TICKS, charged)
    # The report, from the database (the server has stopped: SQLite is served by one process at a time).
    out = io.StringIO()
    saved = os.environ.get("GROKGATE_DATA_DIR")
    os.environ["GROKGATE_DATA_DIR"] = str(tmp_path / "data")
    try:
        with contextlib.redirect_stdout(out):
            assert cli_main(["usage", "--by", "model"]) == 0
    finally:
        if saved is None:
            os.environ.pop("GROKGATE_DATA_DIR", None)
        else:
            os.environ["GROKGATE_DATA_DIR"] = saved
    table = out.getvalue()
    assert "upstream_cost_credits" in table and "drift" in table
    line = next(line for line in table.splitlines() if line.lstrip().startswith("grok-3"))
    expected = upstream_drift({"upstream_requests": 1, "upstream_cost_ticks": TICKS, "upstream_charged": charged},
                              1.0)
    assert expected["upstream_cost_credits"] == "0.003776"  # $0.0037756 at 1 credit per USD, rounded
    assert all(value in line for value in expected.values()), (line, expected)


def test_the_drift_is_the_share_of_the_upstreams_cost() -> None:
    row: dict[str, Any] = {"upstream_requests": 3, "upstream_cost_ticks": 2 * 10**10, "upstream_charged": 2_200_000}
    assert upstream_drift(row, 1.0) == {"upstream_cost_credits": "2", "charged_credits": "2.2", "drift": "+10.0%"}
    assert upstream_drift(row, 2.0)["drift"] == "-45.0%"  # 2 credits per USD: the upstream cost 4 credits
    assert upstream_drift({**row, "upstream_requests": 0}, 1.0)["drift"] == "-"


def test_xais_own_figure_reaches_the_ledger_from_chat_and_responses(tmp_path: Path) -> None:
    """Through an xAI route, against the fake xAI (which reports `cost_in_usd_ticks` as xAI does)."""
    from grokgate.providers.base import ModelTable, Route, create
    from grokgate.providers.router import Candidate, RoutedModel
    from tests.fakes.fake_xai import FakeXAI, usd_ticks

    with FakeXAI(api_keys=["xai-key-a"]).start() as fake:
        backend = create("xai", name="xai", base_url=fake.url, api_keys=["xai-key-a"])
        models = ModelTable([Route("grok-3", RoutedModel("grok-3", [Candidate(backend, "grok-3")]), "grok-3")],
                            backends=[backend])
        with app_server(tmp_path, models) as srv:
            secret, key = create_key(srv, "payer", credits="10")  # type: ignore[arg-type]
            answers = [srv.chat({"model": "grok-3", "messages": user("a b c"), "max_tokens": 8}, token=secret).json()]
            with srv.client() as c:
                r = c.post("/v1/responses", json={"model": "grok-3", "input": "a b c", "max_output_tokens": 8},
                           headers={"Authorization": f"Bearer {secret}"})
                assert r.status_code == 200, r.text
                rows = c.get(f"/admin/ledger?token={key['id']}", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        chat_usage = answers[0]["usage"]
        expected = {"chat": usd_ticks(chat_usage["prompt_tokens"], 0, chat_usage["completion_tokens"])}
        responses_usage = r.json()["usage"]
        expected["responses"] = usd_ticks(responses_usage["input_tokens"], 0, responses_usage["output_tokens"])
        got = {row["endpoint"]: row["upstream_cost_ticks"] for row in rows["data"] if row["kind"] == "usage"}
        assert got == expected and all(v > 0 for v in got.values())
