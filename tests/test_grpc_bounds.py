"""The gRPC port's own bounds (rpc/server.py): RPCs in flight at once, past which a new one is RESOURCE_EXHAUSTED
before any servicer code runs, and served again once the others end."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator

import grpc
import pytest
from xai_sdk.proto.v6 import chat_pb2, chat_pb2_grpc

from grokgate.core.events import Delta, Event, Finish
from grokgate.schemas.chat import ChatCompletionRequest
from tests.conftest import TOKEN, free_port
from tests.inproc import ScriptedProvider, app_server, scripted_models

RELEASE = threading.Event()


async def held(request: ChatCompletionRequest, model: str) -> AsyncGenerator[Event]:
    """One word, then nothing until the test releases it."""
    yield Delta(0, content="held")
    await asyncio.to_thread(RELEASE.wait, 30)  # the test sets a threading.Event from its own thread
    yield Finish(0, "stop")


def request() -> chat_pb2.GetCompletionsRequest:
    return chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
        role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="hi")])])


def test_rpcs_past_the_bound_are_refused_at_once_and_served_once_others_end(tmp_path_factory:
                                                                              pytest.TempPathFactory) -> None:
    port = free_port()
    models = scripted_models(ScriptedProvider(script=held))
    RELEASE.clear()
    with app_server(tmp_path_factory.mktemp("grpc-bounds"), models, grpc_port=port, grpc_max_concurrent_rpcs=2), \
            grpc.insecure_channel(f"localhost:{port}") as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        auth = (("authorization", f"Bearer {TOKEN}"),)
        streams = [stub.GetCompletionChunk(request(), metadata=auth) for _ in range(2)]
        try:
            for stream in streams:
                assert next(stream).outputs[0].delta.content == "held"  # both in flight
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetCompletion(request(), metadata=auth, timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            RELEASE.set()
        for stream in streams:
            assert [c for c in stream]  # the held streams end normally
        answer = stub.GetCompletion(request(), metadata=auth, timeout=10)
        assert answer.outputs[0].message.content == "held"


def test_a_caller_without_a_valid_key_is_refused_before_its_message_is_read(tmp_path_factory:
                                                                            pytest.TempPathFactory) -> None:
    """grpc.aio would receive a unary message whole (up to the receive bound) before any code of ours: anyone could
    make the server hold that much per RPC. The key is checked first: a message over the bound from a caller
    without a valid key is UNAUTHENTICATED (its message never read), not RESOURCE_EXHAUSTED (received, measured
    and refused by gRPC); with a valid key the bound still holds."""
    port = free_port()
    big = chat_pb2.GetCompletionsRequest(model="grok-3", messages=[chat_pb2.Message(
        role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="x" * (2 * 1024 * 1024))])])
    with app_server(tmp_path_factory.mktemp("grpc-unread"), grpc_port=port, max_body_bytes=1024 * 1024), \
            grpc.insecure_channel(f"localhost:{port}", options=[("grpc.max_send_message_length", 8 << 20)]) as channel:
        # A method grokgate does not serve is refused before its message is read too (UNIMPLEMENTED, not
        # RESOURCE_EXHAUSTED), whoever calls it.
        with pytest.raises(grpc.RpcError) as unserved:
            channel.unary_unary("/xai_api.Image/GenerateImage")(big.SerializeToString(), timeout=20)
        assert unserved.value.code() == grpc.StatusCode.UNIMPLEMENTED, unserved.value.details()
        stub = chat_pb2_grpc.ChatStub(channel)
        for metadata, code in ((("authorization", "Bearer gg-not-a-key"),), grpc.StatusCode.UNAUTHENTICATED), \
                              (((), grpc.StatusCode.UNAUTHENTICATED)), \
                              ((("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.RESOURCE_EXHAUSTED):
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetCompletion(big, metadata=metadata, timeout=20)
            assert refused.value.code() == code, refused.value.details()
