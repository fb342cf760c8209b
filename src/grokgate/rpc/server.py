"""The gRPC server: started by app.py's lifespan on the HTTP server's event loop, stopped before the backends.

Bounds, so that no client (authenticated or not) holds more than its share of memory, descriptors or the loop:
- a request message larger than GROKGATE_MAX_BODY_BYTES is refused by gRPC itself (RESOURCE_EXHAUSTED, before
  anything is parsed), as HTTP refuses such a body with a 413;
- RPCs in flight at once (`max_concurrent_rpcs`, GROKGATE_GRPC_MAX_CONCURRENT_RPCS): past it a new RPC is
  RESOURCE_EXHAUSTED at once, before any servicer code; HTTP/2 streams per connection (`max_streams`);
- connections in all (`max_connections`: GROKGATE_MAX_CONNECTIONS, or half of what the descriptor limit
  leaves, the other half being HTTP's), a TLS/HTTP/2 handshake within GROKGATE_HEADER_TIMEOUT_SECONDS, an idle
  connection closed after IDLE_SECONDS, and metadata at most METADATA_BYTES (gRPC's own default).
`so_reuseport` is off, so a second server on a taken port fails at start instead of silently sharing its
connections (gRPC's default on Linux is on).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from grokgate.rpc.unimplemented import Unimplemented

log = logging.getLogger("grokgate.rpc")

Register = Callable[[grpc.aio.Server], Iterable[str]]
"""Adds servicers to the server; returns the full names of the services it added (xai_api.Chat, ...)."""

MAX_SEND_BYTES = 64 * 1024 * 1024  # an answer's largest message (n choices of long text, one collected answer)
IDLE_SECONDS = 300  # a connection with no RPC for this long is closed (the client reconnects when it needs to)
METADATA_BYTES = 8 * 1024
STOP_GRACE_SECONDS = 5.0  # as uvicorn's timeout_graceful_shutdown: RPCs in flight may finish meanwhile


class RpcServer:
    def __init__(self, host: str, port: int, register: Iterable[Register], *, max_receive_bytes: int,
                 tls_cert: Path | None = None, tls_key: Path | None = None, max_concurrent_rpcs: int = 4096,
                 max_streams: int = 100, max_connections: int = 0, handshake_seconds: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.max_receive_bytes = max_receive_bytes
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.max_streams = max_streams
        self.max_connections = max_connections  # 0: gRPC's own (unbounded)
        self.handshake_seconds = handshake_seconds
        self.tls = (tls_cert, tls_key) if tls_cert is not None and tls_key is not None else None
        self._register = list(register)
        self._server: grpc.aio.Server | None = None
        self.services: list[str] = []
        self.bound_port: int | None = None

    async def start(self) -> None:
        """Bind and serve (in the running event loop). A port that cannot be bound fails the start."""
        options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", self.max_receive_bytes),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", self.max_streams),
            ("grpc.max_connection_idle_ms", IDLE_SECONDS * 1000),
            ("grpc.server_handshake_timeout_ms", int(self.handshake_seconds * 1000)),
            ("grpc.max_metadata_size", METADATA_BYTES),
        ]
        if self.max_connections:
            options.append(("grpc.max_allowed_incoming_connections", self.max_connections))
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=self.max_concurrent_rpcs)
        for register in self._register:
            self.services.extend(register(server))
        server.add_generic_rpc_handlers([Unimplemented(lambda: self.services)])
        address = f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"
        if self.tls is not None:
            cert, key = self.tls
            credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
            bound = server.add_secure_port(address, credentials)
        else:
            if not _loopback(self.host):
                log.warning("the gRPC API serves %s in plaintext: set GROKGATE_GRPC_TLS_CERT and "
                            "GROKGATE_GRPC_TLS_KEY, or put a TLS proxy in front", address)
            bound = server.add_insecure_port(address)
        if not bound:
            raise OSError(f"the gRPC API cannot listen on {address} (GROKGATE_GRPC_PORT)")
        self.bound_port = bound
        await server.start()
        self._server = server
        log.info("gRPC API on %s (%s)", address, "TLS" if self.tls else "plaintext")

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(STOP_GRACE_SECONDS)
            self._server = None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
