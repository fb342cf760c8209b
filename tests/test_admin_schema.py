"""The admin and account routes answer what /openapi.json says (issue 9, item 12): every JSON answer validates
against its documented schema, a schema-valid request is accepted (zero initial credits) or refused as
documented (403 for the bootstrap admin token on a holder's own routes), and the credit, price and date formats
the document states are exactly the ones the server takes.

One in-process app (tests/inproc.py), accounts on (SQLite in tmp_path), a scripted provider: no model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest

from tests.conftest import TOKEN, call, create_key, err, ok, user
from tests.inproc import AppServer, app_server

CHAT = {"model": "grok-3", "messages": user("Say hi."), "max_tokens": 5}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """The app in this process (tests/inproc.py): accounts on, a scripted provider for every model."""
    tmp = tmp_path_factory.mktemp("admin-schema")
    with app_server(tmp) as server:
        server.extra["data_dir"] = tmp / "data"  # app_settings' data_dir: the CLI opens the same SQLite file
        yield server


@pytest.fixture(scope="module")
def doc(srv: AppServer) -> dict[str, Any]:
    document: dict[str, Any] = ok(call(srv, "GET", "/openapi.json", None))
    return document


@pytest.fixture(scope="module")
def holder(srv: AppServer) -> tuple[str, dict[str, Any]]:
    """An account token with credits, a top-up and one usage row in the ledger."""
    secret, key = create_key(srv, "schema-holder", "5")
    ok(call(srv, "POST", f"/admin/keys/{key['id']}/credits", TOKEN, json={"amount": "1.25", "note": "more"}))
    assert srv.chat(CHAT, token=secret).status_code == 200
    return secret, key


def name() -> str:
    return f"k-{uuid.uuid4().hex[:10]}"


def cli(srv: AppServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GROKGATE_DATA_DIR": str(srv.extra["data_dir"])}
    env.pop("GROKGATE_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "grokgate", *args], env=env, capture_output=True, text=True,
                          timeout=120)


# -- the document ------------------------------------------------------------------------------------------------


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator for one schema of the document, its `#/components/...` references resolvable."""
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]},
                                           format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def operation(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    op: dict[str, Any] = doc["paths"][path][method.lower()]
    return op


def body_schema(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    schema: dict[str, Any] = operation(doc, method, path)["requestBody"]["content"]["application/json"]["schema"]
    return schema


def query_schema(doc: dict[str, Any], method: str, path: str, parameter: str) -> dict[str, Any]:
    schema: dict[str, Any] = next(p["schema"] for p in operation(doc, method, path)["parameters"]
                                  if p["name"] == parameter)
    return schema


def check_answer(doc: dict[str, Any], method: str, path: str, r: httpx.Response) -> Any:
    """The answer's JSON validates against the schema documented for its status, which is a closed object (so
    a key the document does not name is drift)."""
    responses = operation(doc, method, path)["responses"]
    assert str(r.status_code) in responses, (method, path, r.status_code, sorted(responses))
    schema = responses[str(r.status_code)]["content"]["application/json"]["schema"]
    assert "$ref" in schema, (method, path, schema)
    component = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    assert component.get("additionalProperties") is False, (method, path, component)
    body = r.json()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator(doc, schema).iter_errors(body)]
    assert not errors, (method, path, errors, body)
    return body


def test_every_admin_and_account_answer_matches_its_documented_schema(
        srv: AppServer, doc: dict[str, Any], holder: tuple[str, dict[str, Any]]) -> None:
    secret, key = holder
    ref = key["id"]
    ok(call(srv, "PUT", "/admin/prices/schema-model", TOKEN,
            json={"input": "1", "cached_input": "0.5", "output": "2"}))
    victim = create_key(srv, name())[1]
    account = ok(call(srv, "POST", "/admin/accounts", TOKEN, json={"name": name()}), 201)["id"]
    answers = [
        ("POST", "/admin/accounts", "/admin/accounts", TOKEN, {"name": name(), "credits": "1", "rpm": 5}),
        ("GET", "/admin/accounts", "/admin/accounts", TOKEN, None),
        ("POST", "/admin/accounts/{ref}/credits", f"/admin/accounts/{account}/credits", TOKEN, {"amount": "1"}),
        ("POST", "/admin/accounts/{ref}/keys", f"/admin/accounts/{account}/keys", TOKEN,
         {"name": name(), "spend_limit": "0.5", "period": "weekly"}),
        ("GET", "/admin/accounts/{ref}", f"/admin/accounts/{account}", TOKEN, None),
        ("PATCH", "/admin/accounts/{ref}", f"/admin/accounts/{account}", TOKEN, {"tpm": 1000, "name": name()}),
        ("POST", "/admin/accounts/{ref}/disable", f"/admin/accounts/{account}/disable", TOKEN, None),
        ("POST", "/admin/keys/{ref}/rotate", f"/admin/keys/{victim['id']}/rotate", TOKEN, {"grace_seconds": 5}),
        ("POST", "/admin/keys", "/admin/keys", TOKEN, {"name": name(), "credits": "2", "rpm": 5}),
        ("POST", "/admin/keys", "/admin/keys", TOKEN,
         {"name": name(), "allowed_models": ["grok-3"], "expires_at": 4_000_000_000}),
        ("GET", "/admin/keys", "/admin/keys", TOKEN, None),
        ("GET", "/admin/keys/{ref}", f"/admin/keys/{ref}", TOKEN, None),
        ("PATCH", "/admin/keys/{ref}", f"/admin/keys/{ref}", TOKEN, {"tpm": 100_000}),
        ("POST", "/admin/keys/{ref}/credits", f"/admin/keys/{ref}/credits", TOKEN, {"amount": 1}),
        ("DELETE", "/admin/keys/{ref}", f"/admin/keys/{victim['id']}", TOKEN, None),
        ("GET", "/admin/prices", "/admin/prices", TOKEN, None),
        ("PUT", "/admin/prices/{model}", "/admin/prices/schema-model", TOKEN,
         {"input": 3, "cached_input": "0.000001", "output": "0"}),
        ("GET", "/admin/usage", "/admin/usage", TOKEN, None),
        ("GET", "/admin/usage", "/admin/usage?by=model&since=2000-01-01", TOKEN, None),
        ("GET", "/admin/usage", f"/admin/usage?token={ref}", TOKEN, None),
        ("GET", "/admin/ledger", "/admin/ledger", TOKEN, None),
        ("GET", "/admin/ledger", f"/admin/ledger?token={ref}&limit=2", TOKEN, None),
        ("GET", "/v1/balance", "/v1/balance", secret, None),
        ("GET", "/v1/usage", "/v1/usage", secret, None),
        ("GET", "/v1/usage", "/v1/usage?by=model", secret, None),
    ]
    seen: dict[str, set[str]] = {}
    for method, template, path, token, body in answers:
        r = call(srv, method, path, token, json=body)
        assert r.status_code in (200, 201), (path, r.text)
        answer = check_answer(doc, method, template, r)
        if template in ("/admin/usage", "/v1/usage", "/admin/ledger"):
            assert answer["data"], (path, answer)  # rows were checked, not only an empty list
        seen.setdefault(template, set()).add(method)
    documented = {p: {m.upper() for m in item} for p, item in doc["paths"].items()
                  if any("admin" in op.get("tags", ()) or "account" in op.get("tags", ()) for op in item.values())}
    for path, methods in documented.items():
        if path.startswith(("/admin/ledger/", "/v1/ledger", "/admin/models")):
            continue  # api/console.py's, covered by tests/test_openapi_contract.py
        assert methods <= seen.get(path, set()), (path, methods, seen.get(path))


def test_the_ledger_documents_its_milliseconds(srv: AppServer, doc: dict[str, Any],
                                               holder: tuple[str, dict[str, Any]]) -> None:
    """GET /admin/ledger's `created_at` is in milliseconds (unlike every other time, in seconds): the document
    says so, and the value is one."""
    row_schema = doc["components"]["schemas"][
        operation(doc, "GET", "/admin/ledger")["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        .rsplit("/", 1)[1]]["properties"]["data"]["items"]
    row_schema = doc["components"]["schemas"][row_schema["$ref"].rsplit("/", 1)[1]]
    assert "millisecond" in row_schema["properties"]["created_at"]["description"].lower()
    row = ok(call(srv, "GET", "/admin/ledger?limit=1", TOKEN))["data"][0]
    key = ok(call(srv, "GET", f"/admin/keys/{holder[1]['id']}", TOKEN))
    assert row["created_at"] >= key["created_at"] * 1000


# -- zero as an initial balance (ST202) ----------------------------------------------------------------------------


@pytest.mark.parametrize("credits", [0, "0", "0.0", "0e-6"])
def test_a_key_may_start_with_zero_credits(srv: AppServer, credits: Any) -> None:
    r = call(srv, "POST", "/admin/keys", TOKEN, json={"name": name(), "credits": credits})
    key = ok(r, 201)["key"]
    assert (key["balance"], key["balance_credits"]) == (0, "0")
    assert not [row for row in ok(call(srv, "GET", f"/admin/ledger?token={key['id']}", TOKEN))["data"]], \
        "no top-up row for nothing"


def test_the_cli_creates_a_key_with_zero_credits(srv: AppServer) -> None:
    key_name = name()
    done = cli(srv, "keys", "create", key_name, "--credits", "0")
    assert done.returncode == 0, done
    assert "balance 0 credits" in done.stdout, done.stdout
    key = ok(call(srv, "GET", f"/admin/keys/{key_name}", TOKEN))
    assert key["balance"] == 0


def test_the_cli_still_refuses_a_zero_top_up(srv: AppServer) -> None:
    _, key = create_key(srv, name(), "1")
    done = cli(srv, "credits", "add", str(key["id"]), "0")
    assert done.returncode == 1 and "positive" in done.stderr and "Traceback" not in done.stderr, done
    assert ok(call(srv, "GET", f"/admin/keys/{key['id']}", TOKEN))["balance"] == 1_000_000


@pytest.mark.parametrize("amount", [0, "0", "0.000000"])
def test_top_ups_stay_positive(srv: AppServer, amount: Any) -> None:
    _, key = create_key(srv, name(), "1")
    err(call(srv, "POST", f"/admin/keys/{key['id']}/credits", TOKEN, json={"amount": amount}), 400, "bad_request",
        param="amount")
    assert ok(call(srv, "GET", f"/admin/keys/{key['id']}", TOKEN))["balance"] == 1_000_000


def test_a_bad_initial_amount_names_the_credits_field(srv: AppServer) -> None:
    for credits in ("abc", "-1", "0.0000001", "1000000000"):
        err(call(srv, "POST", "/admin/keys", TOKEN, json={"name": name(), "credits": credits}), 400, "bad_request",
            param="credits")


# -- the formats the document states are the ones the server takes -----------------------------------------------

AMOUNTS: list[Any] = [
    0, 1, 999_999_999, 1_000_000_000, 10**30, -1, 2.0, 2.5, 1e-7, True,
    "0", "10", "0.5", "0.25", "999999999.999999", "1000000000", "0.0000001", "1e-6", "1500e-6", "5e-3",
    "", " ", "abc", "-1", "+1", "1.", ".5", "1_000", "Infinity", "NaN", "0x10", "1e3", "\u0661", "\uff11",
    "10 ", " 10", "1,5", "1.2345678",
]


def server_takes(r: httpx.Response) -> bool:
    assert r.status_code in (200, 201, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["code"] == "bad_request", r.text
    return r.status_code in (200, 201)


@pytest.mark.parametrize("value", AMOUNTS, ids=repr)
def test_initial_credits_are_taken_exactly_when_the_document_allows_them(srv: AppServer, doc: dict[str, Any],
                                                                         value: Any) -> None:
    body = {"name": name(), "credits": value}
    documented = validator(doc, body_schema(doc, "POST", "/admin/keys")).is_valid(body)
    assert server_takes(call(srv, "POST", "/admin/keys", TOKEN, json=body)) == documented, (value, documented)


@pytest.mark.parametrize("value", AMOUNTS, ids=repr)
def test_top_ups_are_taken_exactly_when_the_document_allows_them(srv: AppServer, doc: dict[str, Any],
                                                                 holder: tuple[str, dict[str, Any]],
                                                                 value: Any) -> None:
    body = {"amount": value}
    documented = validator(doc, body_schema(doc, "POST", "/admin/keys/{ref}/credits")).is_valid(body)
    r = call(srv, "POST", f"/admin/keys/{holder[1]['id']}/credits", TOKEN, json=body)
    assert server_takes(r) == documented, (value, documented)


@pytest.mark.parametrize("value", AMOUNTS, ids=repr)
def test_prices_are_taken_exactly_when_the_document_allows_them(srv: AppServer, doc: dict[str, Any],
                                                                value: Any) -> None:
    body = {"input": "1", "cached_input": "1", "output": value}
    documented = validator(doc, body_schema(doc, "PUT", "/admin/prices/{model}")).is_valid(body)
    r = call(srv, "PUT", "/admin/prices/format-model", TOKEN, json=body)
    assert server_takes(r) == documented, (value, documented)
    if not documented:
        assert r.json()["error"]["param"] == "output", r.text


def test_an_empty_price_is_refused_as_documented(srv: AppServer, doc: dict[str, Any]) -> None:
    body = {"input": "1", "cached_input": "1", "output": ""}
    assert not validator(doc, body_schema(doc, "PUT", "/admin/prices/{model}")).is_valid(body)
    error = err(call(srv, "PUT", "/admin/prices/grok-3", TOKEN, json=body), 400, "bad_request", param="output")
    assert "output" in error["message"], error


DAYS = ["2024-02-29", "2023-02-29", "2024-13-01", "2024-00-10", "2024-1-01", "24-01-01", "", "today",
        "2024-01-01T00:00:00", "\u0662\u0660\u0662\u0664-01-01", "0001-01-01", "9999-12-31"]


@pytest.mark.parametrize("day", DAYS)
def test_usage_since_is_a_date_as_documented(srv: AppServer, doc: dict[str, Any], holder: tuple[str, dict[str, Any]],
                                              day: str) -> None:
    for path, token in (("/admin/usage", TOKEN), ("/v1/usage", holder[0])):
        schema = query_schema(doc, "GET", path, "since")
        assert schema.get("format") == "date", schema
        documented = validator(doc, schema).is_valid(day)
        r = call(srv, "GET", path, token, params={"since": day})
        assert server_takes(r) == documented, (path, day, documented, r.text)
        if not documented:
            assert r.json()["error"]["param"] == "since", r.text


# -- the bootstrap admin token on a holder's own routes: 403, documented ----------------------------------------


@pytest.mark.parametrize("path", ["/v1/balance", "/grok/balance", "/v1/usage", "/grok/usage", "/v1/ledger",
                                  "/v1/ledger/errors"])
def test_own_routes_refuse_the_bootstrap_admin_token_with_403(srv: AppServer, doc: dict[str, Any], path: str) -> None:
    error = err(call(srv, "GET", path, TOKEN), 403, "forbidden")
    assert "bootstrap admin token" in error["message"] and error["type"] == "permission_error", error
    if path in ("/v1/balance", "/v1/usage"):  # the ledger routes' document is api/console.py's
        forbidden = operation(doc, "GET", path)["responses"]["403"]
        assert "bootstrap" in forbidden["description"], forbidden
        assert forbidden["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorEnvelope"}


def test_the_bootstrap_token_is_not_refused_on_its_own_routes_by_a_holder(srv: AppServer,
                                                                          holder: tuple[str, dict[str, Any]]) -> None:
    """An account token still reads its own balance: the 403 is for the token that has no account only."""
    assert ok(call(srv, "GET", "/v1/balance", holder[0]))["token"]["id"] == holder[1]["id"]
