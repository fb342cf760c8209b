"""/openapi.json is true: schemathesis drives every operation of a real server (accounts on, SQLite in tmp_path,
chat routed to the fake xAI upstream), once with an account token and once with the admin token, and checks each
answer against the document: no 5xx, documented status codes, content types, headers and body schemas, 405 with
`Allow` for undeclared methods, and schema-valid requests accepted / schema-violating ones refused.

The run is schemathesis's own (`st run`: examples, coverage and fuzzing phases, every check): its pytest
integration needs a schema at import time or, loaded from a fixture, reads `request.node._nodeid`, which pytest
9.2 no longer has. Its report is the assertion message. The explicit cases below use its Python API.

Two checks are off, because the contract decides otherwise: a request without `Authorization` is answered 400
`no_token` (AceData's code: core/admission.py `bearer_token`, tests/test_errors.py), where `ignored_auth` and
`missing_required_header` expect 401. `test_auth_failures_are_documented` checks those answers instead.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis

from tests.conftest import TOKEN, Server, call, create_key, err, start_server, stop_server, user
from tests.fakes.fake_xai import FakeXAI

pytestmark = pytest.mark.e2e  # the real server, model or databases (tests/conftest.py)

# Per operation, phase and token: enough to walk each parameter's boundaries (coverage phase) plus random
# inputs, and keep the whole file to a minute or two on two cores.
MAX_EXAMPLES = 25
ACCOUNT_CREDITS = "1000000"

# Rules of these operations that a JSON schema cannot state, so a schema-valid request may still get 400:
# since <= until, and a window of at most 366 days whose missing end defaults to today (api/console.py).
CROSS_PARAMETER_RULES = ["/admin/ledger/search", "/v1/ledger", "/admin/ledger/errors", "/v1/ledger/errors"]
ACCEPTED_WITH_CROSS_RULES = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]
CHECKS_OFF = {"ignored_auth": {"enabled": False}, "missing_required_header": {"enabled": False}}


def config_toml() -> str:
    """schemathesis.toml: deterministic, nothing written outside the run's folder, the two checks off."""
    text = f"""
[cache]
enabled = false

[generation]
max-examples = {MAX_EXAMPLES}
database = "none"
deterministic = true

[phases.stateful]
enabled = false

[checks.ignored_auth]
enabled = false

[checks.missing_required_header]
enabled = false
"""
    for path in CROSS_PARAMETER_RULES:
        text += f"""
[[operations]]
include-path = "{path}"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED_WITH_CROSS_RULES!r}
""".replace("'", '"')
    return text


def write_routing(tmp: Path, fake: FakeXAI) -> Path:
    path = tmp / "grokgate.yaml"
    path.write_text(f"""
backends:
  up: {{kind: xai, base_url: "{fake.url}", api_key_env: XAI_KEY}}
models:
  grok-3: [{{backend: up}}]
  grok-3-mini: [{{backend: up}}]
""")
    return path


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("contract")
    with FakeXAI().start() as fake:
        srv = start_server(tmp, env={"GROKGATE_CONFIG": str(write_routing(tmp, fake)), "XAI_KEY": "xai-test-key"},
                           name="contract")
        yield srv
        stop_server(srv)


@pytest.fixture(scope="module")
def account_token(gw: Server) -> str:
    secret, _ = create_key(gw, "contract-holder", ACCOUNT_CREDITS)
    return secret


@pytest.fixture(scope="module")
def api(gw: Server) -> Any:
    config = schemathesis.Config.from_dict({"checks": CHECKS_OFF})
    return schemathesis.openapi.from_url(f"{gw.url}/openapi.json", config=config)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def schemathesis_run(gw: Server, token: str, tmp: Path, *excluded: str) -> tuple[int, int]:
    """`st run` over every operation but those whose path matches one of the `excluded` regexes; returns
    (operations run, operations in the document)."""
    (tmp / "schemathesis.toml").write_text(config_toml())
    # One alternation: given `--exclude-path-regex` twice, `st run` keeps only the last one (the account run
    # used to fuzz every admin operation for 403s, a third of this file's time, for nothing).
    exclude = ["--exclude-path-regex", "|".join(f"(?:{pattern})" for pattern in excluded)] if excluded else []
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(tmp / "schemathesis.toml"), "--no-color",
         "run", f"{gw.url}/openapi.json", "-H", f"Authorization: Bearer {token}", "--workers", "1", *exclude,
         # Every failure of an operation, not only its first; bodies as sent (test tokens only, nothing secret).
         "--continue-on-failure", "--output-sanitize", "false", "--request-timeout", "60"],
        cwd=tmp, capture_output=True, text=True, timeout=600,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-20000:]
    selected = re.search(r"Operations:\s+(\d+) selected / (\d+) total", report)
    assert selected, report[-5000:]
    return int(selected.group(1)), int(selected.group(2))
    assert "No issues found" in report or "passed" in report, report[-5000:]


# Each operation is driven once, with the token it is for: chat, responses, models, balance and ledger with an
# account token (the billed path), the admin API with the admin token. What the other token gets there (403 on the
# admin API for an account token) is checked below, operation by operation. Chat and the Responses operations are
# served under /v1 and /grok with one definition each (test_grok_paths_are_the_v1_operations): generated inputs go
# to /v1, the explicit chat cases below to both. Fuzzing them twice more took most of this file's time.
ADMIN_PATHS = r"^/admin/"
GROK_TWINS = r"^/grok/(chat/completions|responses)"
MODEL_PATHS = r"^/(v1|grok)/(chat/completions|responses)"


# The account token goes first: the admin run may disable, change or delete whichever token a drawn `ref` names.
def test_every_operation_with_an_account_token(gw: Server, account_token: str, api: Any, tmp_path: Path) -> None:
    operations = [op for op in (result.ok() for result in api.get_all_operations())]
    admin = [op for op in operations if op.path.startswith("/admin/")]
    assert admin and len(admin) < len(operations)
    twins = [op for op in operations if re.match(GROK_TWINS, op.path)]
    assert len(twins) == 5, [op.label for op in twins]
    ran, total = schemathesis_run(gw, account_token, tmp_path, ADMIN_PATHS, GROK_TWINS)
    assert (ran, total) == (total - len(admin) - len(twins), len(operations)), "every operation but admin and /grok"


def test_every_operation_with_the_admin_token(gw: Server, api: Any, tmp_path: Path) -> None:
    ran, total = schemathesis_run(gw, TOKEN, tmp_path, MODEL_PATHS)
    assert ran == total - 10, "every operation but chat and responses, on both paths"


@pytest.mark.parametrize(("method", "path"), [("POST", "/chat/completions"), ("POST", "/responses"),
                                              ("GET", "/responses/{response_id}"),
                                              ("DELETE", "/responses/{response_id}"),
                                              ("GET", "/responses/{response_id}/input_items")])
def test_grok_paths_are_the_v1_operations(api: Any, method: str, path: str) -> None:
    grok, v1 = (api[prefix + path][method].definition.raw for prefix in ("/grok", "/v1"))
    differ = {key for key in grok.keys() | v1.keys() if grok.get(key) != v1.get(key)}
    assert differ <= {"operationId", "summary"}, differ


def test_admin_operations_refuse_an_account_token_as_documented(api: Any, gw: Server, account_token: str) -> None:
    admin = [op for op in (result.ok() for result in api.get_all_operations()) if op.path.startswith("/admin/")]
    assert len(admin) >= 10, [op.label for op in admin]
    for op in admin:
        assert "403" in op.definition.raw["responses"], op.label
        path = op.path.replace("{ref}", "1").replace("{model}", "grok-3")
        body = {} if "requestBody" in op.definition.raw else None
        err(call(gw, op.method.upper(), path, account_token, json=body), 403, "forbidden")


# -- what generated inputs rarely reach ----------------------------------------------------------------------

CHAT = {"model": "grok-3", "messages": user("Say hi."), "max_tokens": 5}


@pytest.mark.parametrize("body", [CHAT, {**CHAT, "n": 2, "model": "grok-3-mini"}, {**CHAT, "stream": True},
                                  {**CHAT, "stream": True, "stream_options": {"include_usage": True}}])
@pytest.mark.parametrize("path", ["/grok/chat/completions", "/v1/chat/completions"])
def test_answered_chat_completions_match_the_document(api: Any, account_token: str, path: str,
                                                      body: dict[str, Any]) -> None:
    case = api[path]["POST"].Case(body=body)
    response = case.call_and_validate(headers=bearer(account_token))
    assert response.status_code == 200, response.text
    expected = "text/event-stream" if body.get("stream") else "application/json"
    assert response.headers["content-type"][0].startswith(expected)


def test_ledger_pages_and_csv_match_the_document(api: Any, gw: Server, account_token: str) -> None:
    """With rows in the ledger (the chats above, a top-up): JSON pages, a cursor, CSV and error counts."""
    call(gw, "POST", "/grok/chat/completions", account_token, json=CHAT)
    for path, token in (("/admin/ledger/search", TOKEN), ("/v1/ledger", account_token)):
        page = api[path]["GET"].Case(query={"limit": 1}).call_and_validate(headers=bearer(token))
        cursor = page.json()["next_cursor"]
        assert cursor is not None
        api[path]["GET"].Case(query={"limit": 1, "cursor": cursor}).call_and_validate(headers=bearer(token))
        csv = api[path]["GET"].Case(query={"limit": 1, "format": "csv"}).call_and_validate(headers=bearer(token))
        assert csv.headers["content-type"][0].startswith("text/csv")
    for path, token in (("/admin/ledger/errors", TOKEN), ("/v1/ledger/errors", account_token)):
        api[path]["GET"].Case().call_and_validate(headers=bearer(token))
    api["/admin/usage"]["GET"].Case(query={"format": "csv"}).call_and_validate(headers=bearer(TOKEN))


def test_auth_failures_are_documented(api: Any, gw: Server) -> None:
    """Every operation that declares bearer authentication answers a missing token with 400 `no_token` and
    a wrong one with 401 `invalid_token`, and documents both."""
    secured = [op for op in (result.ok() for result in api.get_all_operations())
               if op.definition.raw.get("security")]
    assert secured
    for op in secured:
        documented = set(op.definition.raw["responses"])
        assert {"400", "401"} <= documented, op.label
        path = op.path.replace("{ref}", "1").replace("{model}", "grok-3")
        body = {} if "requestBody" in op.definition.raw else None
        err(call(gw, op.method.upper(), path, None, json=body), 400, "no_token")
        err(call(gw, op.method.upper(), path, "not-a-token", json=body), 401, "invalid_token")


def test_token_references_that_fail_are_documented(api: Any, gw: Server) -> None:
    """A reference to no token (404) or to two (409) is an answer the document lists, in the envelope."""
    create_key(gw, "twin")
    create_key(gw, "twin")
    for ref, status in (("twin", 409), ("no-such-token", 404)):
        response = api["/admin/keys/{ref}"]["GET"].Case(path_parameters={"ref": ref}).call_and_validate(
            headers=bearer(TOKEN))
        assert response.status_code == status, response.text
        search = api["/admin/ledger/search"]["GET"].Case(query={"token": ref}).call_and_validate(headers=bearer(TOKEN))
        assert search.status_code == status, search.text
