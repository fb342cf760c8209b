"""An upstream that repeats grokgate's key in its error puts it neither in the client's error nor in the server's
log: the message reaches them with the key redacted (core/redaction.py) and the rest of its text kept.

The redaction itself, shape by shape; then grokgate in process in front of the fake vLLM (its 400 quotes the
request's headers when `echo_headers` is on) and the fake xAI (`echo=1` faults), on every path an upstream's
message takes: a refusal before the first byte (chat, xAI's Responses API) and an error inside the stream
before and after the first byte.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from grokgate.app import create_app
from grokgate.core.redaction import REDACTED, redact
from grokgate.observability.logging import JSONFormatter
from tests.conftest import call, user
from tests.fakes.fake_vllm import FakeVLLM
from tests.fakes.fake_xai import FakeXAI
from tests.inproc import AppServer, app_settings, serve_app

# A vLLM `--api-key` is whatever the operator typed: this one has no shape a pattern would know.
VLLM_KEY = "correcthorsebatterystaple"
XAI_KEY = "xai-9fQe2LrT0bW7yKc3NvA8sHdJ4mPzX1uG6oRiE5"


# -- the redaction ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("headers: {'authorization': 'Bearer key-a'}", "headers: {'authorization': 'Bearer [redacted]'}"),
    ("x-api-key: myvllmsecretpassphrase", "x-api-key: [redacted]"),
    ("api_key=Zx9Qw8Er7Ty6", "api_key=[redacted]"),
    ("authorization=Bearer%20sk-abc123def456", "authorization=Bearer%20[redacted]"),
    ("sent Bearer abc.def.ghi-jkl", "sent Bearer [redacted]"),
    ("input_value='xai-AbCdEf0123456789'", "input_value='[redacted]'"),
    ("token=abcdef123", "token=[redacted]"),
    ("sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "sha [redacted]"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THs",
     "jwt [redacted].[redacted].[redacted]"),
])
def test_credentials_of_every_shape_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "Missing bearer or basic authentication in header",
    "Invalid token provided",
    "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens.",
    "The model grok-4-1-fast-non-reasoning does not exist",
    "Incorrect API key provided: xa***ey. You can obtain an API key from https://console.x.ai.",
    "request 3f1b2c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d failed",
])
def test_ordinary_text_passes(text: str) -> None:
    assert redact(text) == text


def test_named_secrets_go_whatever_their_shape() -> None:
    assert redact("key correcthorsebatterystaple is not valid", [VLLM_KEY]) == "key [redacted] is not valid"
    assert redact("abc abc", ["abc"]) == "abc abc"  # too short to be anyone's key
    echoed = f"{{'authorization': 'Bearer {VLLM_KEY}'}}"
    assert redact(echoed, [VLLM_KEY]) == "{'authorization': 'Bearer [redacted]'}"


def test_a_long_message_is_read_only_so_far_and_no_key_is_cut_in_half() -> None:
    from grokgate.providers.upstream_errors import MESSAGE_CHARS, upstream_message

    huge = "x " * 5000
    message = upstream_message(('{"error": {"message": "bad value ' + huge + '"}}').encode())
    assert message.startswith("bad value x x") and len(message) <= MESSAGE_CHARS
    # A key where the cut would fall: neither whole nor in part.
    text = "y" * (4 * MESSAGE_CHARS - 10) + " xai-9fQe2LrT0bW7yKc3NvA8sHd"
    assert "xai" not in upstream_message(text) and "9fQe" not in upstream_message(text)
    assert upstream_message(b"oops sk-abc123def456ghi789") == f"oops {REDACTED}"


# -- grokgate in front of echoing upstreams ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm() -> Iterator[FakeVLLM]:
    with FakeVLLM(api_key=VLLM_KEY).start() as fake:
        fake.echo_headers = True
        yield fake


@pytest.fixture(scope="module")
def xai() -> Iterator[FakeXAI]:
    with FakeXAI(api_keys=[XAI_KEY]).start() as fake:
        yield fake


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, vllm: FakeVLLM, xai: FakeXAI) -> Iterator[AppServer]:
    tmp = tmp_path_factory.mktemp("redaction")
    config = tmp / "grokgate.yaml"
    config.write_text(f"""
backends:
  vllm: {{kind: openai, base_url: {vllm.url}, api_key_env: VLLM_KEY, cooldown: 0.01}}
  xai: {{kind: xai, base_url: {xai.url}, api_key_env: XAI_KEY, cooldown: 0.01}}
models:
  grok-3: [{{backend: vllm, model: served-model}}]
  grok-4: [{{backend: xai}}]
""")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_KEY", VLLM_KEY)
        mp.setenv("XAI_KEY", XAI_KEY)
        with serve_app(create_app(app_settings(tmp, config=config, accounts=False))) as srv:
            yield srv


@pytest.fixture
def server_log(vllm: FakeVLLM, xai: FakeXAI) -> Iterator[io.StringIO]:
    """What the server writes to its log (its JSON lines, tracebacks included) during the test."""
    vllm.stream_error_field, vllm.stream_error_after = None, 0
    xai.reset()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("grokgate")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def clean(text: str, key: str) -> None:
    assert key not in text
    assert key[-12:] not in text  # nor its tail


def test_a_400_that_quotes_the_authorization_header(gw: AppServer, server_log: io.StringIO) -> None:
    r = gw.chat({"model": "grok-3", "messages": user("hi"), "top_k": "x"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    clean(r.text, VLLM_KEY)
    assert "input_value='x'" in message and f"'authorization': 'Bearer {REDACTED}'" in message
    assert '"status":400' in server_log.getvalue()  # the request's own line was written
    clean(server_log.getvalue(), VLLM_KEY)


@pytest.mark.parametrize("after", [0, 2])
def test_an_error_inside_the_stream_that_quotes_the_key(gw: AppServer, vllm: FakeVLLM, server_log: io.StringIO,
                                                        after: int) -> None:
    vllm.stream_error_field, vllm.stream_error_after = "guided_grammar", after
    r = gw.chat({"model": "grok-3", "messages": user("hi"), "stream": True, "guided_grammar": "g"})
    clean(r.text, VLLM_KEY)
    assert "Invalid guided_grammar: 'g'" in r.text and REDACTED in r.text
    if after:
        assert r.status_code == 200 and "Hello" in r.text  # the error came after the first bytes
    else:
        assert r.status_code == 400
    clean(server_log.getvalue(), VLLM_KEY)


def test_xai_refusal_before_the_first_byte(gw: AppServer, xai: FakeXAI, server_log: io.StringIO) -> None:
    xai.fail_next({"fault": "403", "echo": 1})
    r = gw.chat({"model": "grok-4", "messages": user("hi")})
    assert r.status_code == 502, r.text
    clean(r.text, XAI_KEY)
    assert "does not have permission for this request" in r.json()["error"]["message"]
    assert REDACTED in r.json()["error"]["message"]
    xai.fail_next({"fault": "500", "echo": 1})  # a server error: its message goes to the log, redacted
    assert gw.chat({"model": "grok-4", "messages": user("hi")}).status_code == 502
    log = server_log.getvalue()
    assert "fake xAI fault 500" in log and REDACTED in log
    clean(log, XAI_KEY)


@pytest.mark.parametrize("after", [0, 2])
def test_xai_responses_failure_inside_the_stream(gw: AppServer, xai: FakeXAI, server_log: io.StringIO,
                                                 after: int) -> None:
    xai.fail_next({"fault": "failed", "echo": 1, "after": after})
    r = call(gw, "POST", "/grok/responses", gw.token, json={"model": "grok-4", "input": "hi", "stream": True})
    clean(r.text, XAI_KEY)
    assert "fake xAI fault failed" in r.text and REDACTED in r.text
    assert r.status_code == (200 if after else 502), r.text
    clean(server_log.getvalue(), XAI_KEY)
