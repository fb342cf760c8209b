"""`xai_api.Chat` over the serving lifecycle (to be written: GetCompletion, GetCompletionChunk, deferred and stored
completions)."""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from grokgate.api.deps import Gateway
from grokgate.rpc.server import Register


def register(gw: Gateway) -> Register:
    def add(server: grpc.aio.Server) -> Iterable[str]:
        return []

    return add
