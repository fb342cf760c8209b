"""Every RPC of xAI's protos (every service and method of xai-sdk's `xai_sdk.proto.v6`, served or not) fuzzed over
a raw channel against the in-process app with the gRPC port on: random bytes, cut and bit-flipped messages, fields
with the wrong wire type, invalid UTF-8 in string fields, deep nesting, messages just over (and just under) the
receive bound, and well-formed messages with extreme values (every number at its max, min, negative, NaN and
infinite, unknown enum values, repeated fields as long as the bound allows, everything empty). Chat's completion
requests get their own cases as well (n and max_tokens huge, temperature NaN, 100k empty messages, an unknown role).

What must hold: no answer is INTERNAL or UNKNOWN, none carries a traceback, nothing hangs, a message over the bound
is RESOURCE_EXHAUSTED, and the server still serves (ListLanguageModels) after each method's batch. A method that is
not served answers UNIMPLEMENTED: it gets a sample of the cases (nothing of the message is parsed there). So a
method that becomes served (Chat) is fuzzed in full by this same test, with no change to it.

Deterministic: every case comes from a `random.Random` seeded with the method's name.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import xai_sdk.proto.v6 as protos
from google.protobuf import empty_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from xai_sdk.proto.v6 import chat_pb2, models_pb2_grpc

from tests.conftest import TOKEN, free_port
from tests.inproc import app_server

MAX_BODY = 256 * 1024  # GROKGATE_MAX_BODY_BYTES of the server: its gRPC receive bound (rpc/server.py)
SEED = 18
METADATA = (("authorization", f"Bearer {TOKEN}"),)
HANG_SECONDS = 60  # a call not answered by then hangs: a bound on a failure, never a measured time
NOT_SERVED = "grokgate does not serve"
DECODER_REFUSAL = "bad_request: the request is not a valid message"  # rpc/handlers.py
TRACEBACK_MARKS = ("Traceback", "Exception calling application", "Unexpected <class", 'File "')
GROKGATES = re.compile(r"[a-z_]+: |grokgate does not serve ")  # how grokgate's own details begin (rpc/errors.py)
UNKNOWN_FIELD = 1999  # a field number none of xAI's messages uses
MAX_DEPTH = 4  # how deep a generated message nests its message fields (xAI's request messages have no cycles)


def _methods() -> list[MethodDescriptor]:
    found: list[MethodDescriptor] = []
    for info in pkgutil.iter_modules(protos.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"{protos.__name__}.{info.name}")
            for service in module.DESCRIPTOR.services_by_name.values():
                found.extend(service.methods)
    return sorted(found, key=lambda m: m.full_name)


METHODS = _methods()


# -- the wire format, by hand ---------------------------------------------------------------------------------

VARINT, FIXED64, DELIMITED, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5
T = FieldDescriptor


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative number as protobuf sends it: ten bytes of two's complement
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def delimited(number: int, payload: bytes) -> bytes:
    return key(number, DELIMITED) + varint(len(payload)) + payload


PAYLOADS = {VARINT: varint(2**64 - 1), FIXED64: b"\xff" * 8, DELIMITED: varint(3) + b"abc", FIXED32: b"\xff" * 4,
            START_GROUP: b"", END_GROUP: b"", 6: b"\x01", 7: b"\x01"}  # 6, 7: wire types that do not exist


def wire_of(field: FieldDescriptor) -> int:
    if field.type in (T.TYPE_DOUBLE, T.TYPE_FIXED64, T.TYPE_SFIXED64):
        return FIXED64
    if field.type in (T.TYPE_FLOAT, T.TYPE_FIXED32, T.TYPE_SFIXED32):
        return FIXED32
    if field.type in (T.TYPE_STRING, T.TYPE_BYTES, T.TYPE_MESSAGE):
        return DELIMITED
    if field.type == T.TYPE_GROUP:
        return START_GROUP
    return VARINT


# -- well-formed messages with extreme values -----------------------------------------------------------------

MODES = ("typical", "empty", "max", "min", "negative", "nan")
_INTS = {T.TYPE_INT32: (-(2**31), 2**31 - 1), T.TYPE_SINT32: (-(2**31), 2**31 - 1),
         T.TYPE_SFIXED32: (-(2**31), 2**31 - 1), T.TYPE_INT64: (-(2**63), 2**63 - 1),
         T.TYPE_SINT64: (-(2**63), 2**63 - 1), T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
         T.TYPE_UINT32: (0, 2**32 - 1), T.TYPE_FIXED32: (0, 2**32 - 1), T.TYPE_UINT64: (0, 2**64 - 1),
         T.TYPE_FIXED64: (0, 2**64 - 1)}
ODD_TEXT = "\x00\u202e\ufeff\U0010ffff<|im_end|>{\"a\":" * 40  # NUL, bidi override, BOM, the last code point
TYPICAL_TEXT = ("hello", "grok-3", "grok-4", "{}", '{"type": "object"}', "a b c", "user")


def scalar(field: FieldDescriptor, mode: str, rng: random.Random) -> Any:
    t = field.type
    if t in _INTS:
        low, high = _INTS[t]
        return {"typical": rng.randint(0, 100), "empty": 0, "max": high, "min": low, "negative": max(low, -1),
                "nan": high}[mode]
    if t in (T.TYPE_DOUBLE, T.TYPE_FLOAT):
        return {"typical": rng.random(), "empty": 0.0, "max": math.inf, "min": -math.inf, "negative": -1.5,
                "nan": math.nan}[mode]
    if t == T.TYPE_BOOL:
        return mode != "empty"
    if t == T.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return {"typical": rng.choice(known), "empty": 0, "max": 2**31 - 1, "min": -(2**31), "negative": -1,
                "nan": max(known) + 1}[mode]
    if t == T.TYPE_STRING:
        return {"typical": rng.choice(TYPICAL_TEXT), "empty": "", "max": ODD_TEXT, "min": "", "negative": "-1",
                "nan": "NaN"}[mode]
    return {"typical": b"hi", "empty": b"", "max": bytes(range(256)) * 4, "min": b"", "negative": b"\xff",
            "nan": b"\x00"}[mode]


def _set(message: Message, field: FieldDescriptor, value: Any) -> None:
    try:
        if field.is_repeated:
            getattr(message, field.name).append(value)
        else:
            setattr(message, field.name, value)
    except ValueError:  # a closed enum takes no unknown value: its first one then
        _set(message, field, field.enum_type.values[0].number)


def fill(message: Message, mode: str, rng: random.Random, depth: int = 0, chance: float = 1.0) -> Message:
    """Every field of `message` set as `mode` says (each with probability `chance`), message fields down to
    MAX_DEPTH; a repeated field gets one element (two when typical)."""
    for field in message.DESCRIPTOR.fields:
        if rng.random() >= chance:
            continue
        count = 2 if mode == "typical" and field.is_repeated else 1
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            mapping = getattr(message, field.name)
            map_key = scalar(entry.fields_by_name["key"], mode, rng)
            value_field = entry.fields_by_name["value"]
            if value_field.message_type is not None:
                if depth < MAX_DEPTH:
                    fill(mapping[map_key], mode, rng, depth + 1, chance)
            else:
                try:
                    mapping[map_key] = scalar(value_field, mode, rng)
                except ValueError:
                    pass
        elif entry is not None:
            if depth >= MAX_DEPTH:
                continue
            for _ in range(count):
                child = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
                child.SetInParent()
                fill(child, mode, rng, depth + 1, chance)
        else:
            for _ in range(count):
                _set(message, field, scalar(field, mode, rng))
    return message


def repeated_to_the_bound(cls: type[Message], field: FieldDescriptor, rng: random.Random) -> bytes:
    """`field` repeated as often as fits just under the receive bound (empty elements: the most of them)."""
    one = cls()
    element = scalar(field, "typical", rng) if field.message_type is None else None
    if element is None:
        getattr(one, field.name).add()
    else:
        _set(one, field, element)
    size = max(1, len(one.SerializeToString()))
    message = cls()
    count = (MAX_BODY - 64) // size
    if element is None:
        target = getattr(message, field.name)
        for _ in range(count):
            target.add()
    else:
        getattr(message, field.name).extend([element] * count)
    data = message.SerializeToString()
    return data if len(data) <= MAX_BODY else data[:0]


def string_paths(descriptor: Descriptor, depth: int = 0) -> Iterator[list[int]]:
    """The field numbers down to each string field (through singular and repeated message fields)."""
    for field in descriptor.fields:
        if field.type == T.TYPE_STRING:
            yield [field.number]
        elif field.message_type is not None and depth < MAX_DEPTH:
            for path in string_paths(field.message_type, depth + 1):
                yield [field.number, *path]


def nested(path: list[int], leaf: bytes) -> bytes:
    data = leaf
    for number in reversed(path):
        data = delimited(number, data)
    return data


# -- the cases of one method ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    oversized: bool = False


def chat_cases() -> Iterator[Case]:
    """What matters most for GetCompletion / GetCompletionChunk / StartDeferredCompletion (same request)."""
    def request(**fields: Any) -> chat_pb2.GetCompletionsRequest:
        base = chat_pb2.GetCompletionsRequest(
            model="grok-3", messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="hi")])])
        for name, value in fields.items():
            if isinstance(value, list):
                getattr(base, name).extend(value)
            elif isinstance(value, Message):
                getattr(base, name).CopyFrom(value)
            else:
                setattr(base, name, value)
        return base

    empty = chat_pb2.Message()
    many = chat_pb2.GetCompletionsRequest(model="grok-3")
    many.messages.extend([empty] * 100_000)
    texts = chat_pb2.GetCompletionsRequest(model="grok-3")
    texts.messages.extend([chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="x")])] * 20_000)
    variants: dict[str, Message] = {
        "n huge": request(n=2**31 - 1), "n negative": request(n=-1), "max_tokens huge": request(max_tokens=2**31 - 1),
        "max_tokens negative": request(max_tokens=-(2**31)), "temperature NaN": request(temperature=math.nan),
        "temperature inf": request(temperature=math.inf), "top_p NaN": request(top_p=math.nan),
        "top_p negative": request(top_p=-1.0), "penalties inf": request(frequency_penalty=math.inf,
                                                                        presence_penalty=-math.inf),
        "top_logprobs huge": request(logprobs=True, top_logprobs=2**31 - 1), "seed min": request(seed=-(2**31)),
        "max_turns huge": request(max_turns=2**31 - 1), "100k empty messages": many, "20k messages": texts,
        "no messages": chat_pb2.GetCompletionsRequest(model="grok-3"), "no model": request(model=""),
        "unknown model": request(model="no-such-model\x00"),
        "unknown role": chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
            role=999, content=[chat_pb2.Content(text="hi")])]),
        "negative role": chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
            role=-1, content=[chat_pb2.Content(text="hi")])]),
        "message without content": chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
            role=chat_pb2.ROLE_USER)]),
        "empty content part": chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
            role=chat_pb2.ROLE_USER, content=[chat_pb2.Content()])]),
        "tool result without a call": chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
            role=chat_pb2.ROLE_TOOL, tool_call_id="nope", content=[chat_pb2.Content(text="42")])]),
        "unknown effort": request(reasoning_effort=99), "unknown include": request(include=[99, -1]),
        "unknown tool mode": request(tool_choice=chat_pb2.ToolChoice(mode=99)),
        "tool choice of no tool": request(tool_choice=chat_pb2.ToolChoice(function_name="missing")),
        "tools: 10k empty": request(tools=[chat_pb2.Tool()] * 10_000),
        "tool parameters not JSON": request(tools=[chat_pb2.Tool(function=chat_pb2.Function(
            name="f", parameters="{not json"))]),
        "tool parameters a JSON array": request(tools=[chat_pb2.Tool(function=chat_pb2.Function(
            name="f", parameters="[1, 2]"))]),
        "schema not JSON": request(response_format=chat_pb2.ResponseFormat(
            format_type=chat_pb2.FORMAT_TYPE_JSON_SCHEMA, schema="{")),
        "schema deeply nested": request(response_format=chat_pb2.ResponseFormat(
            format_type=chat_pb2.FORMAT_TYPE_JSON_SCHEMA, schema='{"items":' * 5000 + "{}" + "}" * 5000)),
        "unknown format": request(response_format=chat_pb2.ResponseFormat(format_type=99)),
        "stop: 10k": request(stop=["x"] * 10_000), "unknown previous response": request(
            previous_response_id="resp_no_such", store_messages=True),
        "n huge and streamed usage": request(n=2**31 - 1, max_tokens=2**31 - 1, temperature=math.nan),
    }
    for name, message in variants.items():
        data = message.SerializeToString()
        if len(data) <= MAX_BODY:
            yield Case(f"chat: {name}", data)


def cases(method: MethodDescriptor) -> list[Case]:
    rng = random.Random(f"{SEED}:{method.full_name}")
    descriptor = method.input_type
    cls = GetMessageClass(descriptor)
    out = [Case("empty message", b"")]
    # Just under the bound: parsed, the servicer's (over it: `oversized`).
    filler = MAX_BODY - len(delimited(UNKNOWN_FIELD, b"x" * MAX_BODY)) + MAX_BODY
    out.append(Case("just under the bound (unknown field)", delimited(UNKNOWN_FIELD, b"x" * filler)))
    for path in list(string_paths(descriptor))[:1]:
        under = MAX_BODY - len(nested(path, b"")) - 8
        out.append(Case("a string field just under the bound", nested(path, b"a " * (under // 2))))
    for mode in MODES:
        out.append(Case(f"extreme: {mode}", fill(cls(), mode, rng).SerializeToString()))
    for i in range(3):
        out.append(Case(f"random fields {i}", fill(cls(), "typical", rng, chance=0.5).SerializeToString()))
    valid = fill(cls(), "typical", rng).SerializeToString()
    cuts = sorted({1, len(valid) // 3, len(valid) // 2, len(valid) - 1, *(rng.randrange(1, max(2, len(valid)))
                                                                         for _ in range(4))})
    out.extend(Case(f"cut at {cut} of {len(valid)}", valid[:cut]) for cut in cuts if 0 < cut < len(valid))
    for i in range(6):
        flipped = bytearray(valid or b"\x00")
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        out.append(Case(f"bit flip {i}", bytes(flipped)))
    for i in range(8):
        out.append(Case(f"random bytes {i}", rng.randbytes(rng.choice((1, 2, 7, 64, 4096)))))
    for field in descriptor.fields:
        for wire in sorted(PAYLOADS):
            if wire != wire_of(field):
                out.append(Case(f"{field.name} as wire type {wire}", key(field.number, wire) + PAYLOADS[wire]))
    for path in list(string_paths(descriptor))[:40]:
        out.append(Case(f"bad UTF-8 at {path}", nested(path, b"\xc3\x28\xed\xa0\x80\xff")))
    for depth in (99, 101, 10_000):  # upb parses 100 levels of groups, and refuses more
        out.append(Case(f"unknown groups {depth} deep", key(UNKNOWN_FIELD, START_GROUP) * depth
                        + key(UNKNOWN_FIELD, END_GROUP) * depth))
    out.append(Case("an unknown group never closed", key(UNKNOWN_FIELD, START_GROUP) * 5))
    out.append(Case("unknown messages 10k deep", nested([UNKNOWN_FIELD] * 10_000, b"")))
    out.append(Case("a length past the end", key(1, DELIMITED) + varint(2**31)))
    for field in descriptor.fields:
        if field.is_repeated and not (field.message_type and field.message_type.GetOptions().map_entry):
            data = repeated_to_the_bound(cls, field, rng)
            if data:
                out.append(Case(f"{field.name} repeated to the bound", data))
    if descriptor.full_name == chat_pb2.GetCompletionsRequest.DESCRIPTOR.full_name:
        out.extend(chat_cases())
    return out


def oversized(method: MethodDescriptor) -> list[Case]:
    """Messages just over the receive bound: gRPC refuses them before anything is parsed."""
    out = [Case("just over the bound", delimited(UNKNOWN_FIELD, b"x" * MAX_BODY)[: MAX_BODY + 1], True)]
    for path in list(string_paths(method.input_type))[:1]:
        out.append(Case("a string field over the bound", nested(path, b"a" * MAX_BODY), True))
    return out


# -- calling ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    details: str


def start(channel: grpc.Channel, method: MethodDescriptor, data: bytes) -> Callable[[], Answer]:
    """Send `data` to `method` as its kind requires (bytes in, bytes out); returns what waits for the answer."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kwargs: dict[str, Any] = {"metadata": METADATA, "timeout": HANG_SECONDS}
    stream = [data, data] if data else [data]  # a client stream: of two messages as well as one
    outcome: Any
    if method.client_streaming and method.server_streaming:
        outcome = channel.stream_stream(path)(iter(stream), **kwargs)
    elif method.client_streaming:
        outcome = channel.stream_unary(path).future(iter(stream), **kwargs)
    elif method.server_streaming:
        outcome = channel.unary_stream(path)(data, **kwargs)
    else:
        outcome = channel.unary_unary(path).future(data, **kwargs)

    def answer() -> Answer:
        try:
            if method.server_streaming:
                list(outcome)
            else:
                outcome.result()
        except grpc.RpcError as error:
            return Answer(error.code(), error.details() or "")
        return Answer(grpc.StatusCode.OK, "")

    return answer


def call(channel: grpc.Channel, method: MethodDescriptor, data: bytes) -> Answer:
    return start(channel, method, data)()


def wrong(answer: Answer, case: Case) -> str | None:
    """What is wrong with `answer` to `case`, if anything."""
    if answer.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return f"{answer.code.name}: {answer.details[:300]}"
    if answer.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer in {HANG_SECONDS} s"
    if any(mark in answer.details for mark in TRACEBACK_MARKS):
        return f"a traceback in the details: {answer.details[:300]}"
    if case.oversized and answer.code != grpc.StatusCode.RESOURCE_EXHAUSTED and not (
            answer.code == grpc.StatusCode.UNIMPLEMENTED and NOT_SERVED in answer.details):
        # A method grokgate does not serve is refused before its message is read (rpc/unimplemented.py).
        return f"over the bound but {answer.code.name}"
    if not case.oversized and answer.code != grpc.StatusCode.OK and not GROKGATES.match(answer.details):
        # gRPC's own answer, not grokgate's: e.g. "Stream removed" when the details passed the client's limit
        return f"{answer.code.name} from gRPC itself: {answer.details[:300]}"
    return None


@dataclass
class Served:
    channel: grpc.Channel

    def alive(self) -> bool:
        models = models_pb2_grpc.ModelsStub(self.channel).ListLanguageModels(empty_pb2.Empty(), metadata=METADATA,
                                                                            timeout=HANG_SECONDS)
        return bool(models.models)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port = free_port()
    with app_server(tmp_path_factory.mktemp("grpc-fuzz"), grpc_port=port, max_body_bytes=MAX_BODY):
        options = [("grpc.max_send_message_length", 4 * MAX_BODY)]  # the client may send more than the server takes
        with grpc.insecure_channel(f"localhost:{port}", options=options) as channel:
            yield Served(channel)


def test_every_method_of_xais_protos_is_fuzzed() -> None:
    names = {m.full_name for m in METHODS}
    assert {"xai_api.Chat.GetCompletion", "xai_api.Chat.GetCompletionChunk", "xai_api.Models.ListLanguageModels",
            "xai_api.Tokenize.TokenizeText", "xai_api.Auth.get_api_key_info", "xai_api.Files.UploadFile"} <= names
    assert len(names) == len(METHODS) >= 40
    chat = cases(next(m for m in METHODS if m.full_name == "xai_api.Chat.GetCompletion"))
    assert sum(case.name.startswith("chat: ") for case in chat) >= 30
    assert cases(METHODS[0]) == cases(METHODS[0])  # deterministic


@pytest.mark.parametrize("method", METHODS, ids=[m.full_name for m in METHODS])
def test_no_input_is_the_servers_fault(served: Served, method: MethodDescriptor) -> None:
    all_cases = cases(method)
    probe = call(served.channel, method, b"")
    is_served = not (probe.code == grpc.StatusCode.UNIMPLEMENTED and NOT_SERVED in probe.details)
    # Not served: nothing of the message is parsed, a sample shows that much (the bound still holds).
    chosen = all_cases if is_served else all_cases[::10]
    problems: list[str] = []
    reached = False
    for case in chosen:
        answer = call(served.channel, method, case.data)
        problem = wrong(answer, case)
        if problem is not None:
            problems.append(f"{case.name}: {problem}")
        if is_served and answer.code != grpc.StatusCode.UNIMPLEMENTED:
            reached |= not answer.details.startswith(DECODER_REFUSAL)
        if not is_served and answer.code != grpc.StatusCode.UNIMPLEMENTED:
            problems.append(f"{case.name}: a method not served answered {answer.code.name}")
    assert not problems, f"{method.full_name}:\n" + "\n".join(problems)
    assert served.alive()
    if is_served:  # the fuzz got past the decoder to the servicer's own code
        assert reached, f"{method.full_name}: every case was refused before the servicer"


def test_the_served_services_are_fuzzed_in_full(served: Served) -> None:
    probed = {m.full_name for m in METHODS if NOT_SERVED not in call(served.channel, m, b"").details}
    for name in ("xai_api.Models.ListLanguageModels", "xai_api.Models.GetLanguageModel",
                 "xai_api.Tokenize.TokenizeText", "xai_api.Auth.get_api_key_info"):
        assert name in probed
    assert "xai_api.Image.GenerateImage" not in probed


def test_a_message_over_the_bound_is_resource_exhausted_on_every_method(served: Served) -> None:
    """gRPC refuses it before anything is parsed, whichever served method it was for (one grokgate does not serve
    is UNIMPLEMENTED before its message is read); all sent at once (each refusal takes gRPC a while, the same
    while at once)."""
    sent = [(method, case, start(served.channel, method, case.data)) for method in METHODS
            for case in oversized(method)]
    problems = [f"{method.full_name}: {case.name}: {problem}" for method, case, answer in sent
                if (problem := wrong(answer(), case)) is not None]
    assert not problems, "\n".join(problems)
    assert len(sent) > len(METHODS)
    assert served.alive()
