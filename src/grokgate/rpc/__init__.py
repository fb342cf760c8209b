"""xAI's native gRPC API, what xai-sdk speaks: a third wire format over the one serving lifecycle.

`grokgate serve` runs a grpc.aio server beside uvicorn, in the same process and event loop (settings.grpc_port,
app.py's lifespan starts and stops it). It is a transport layer, as api/ is for HTTP: each RPC authenticates the
caller from its `authorization` metadata (the SDK sends `Bearer <key>`), turns the protobuf request into the
serving layer's call, and maps the result (or a GatewayError) to protobuf messages and gRPC status codes.

- server.py: the server, its bounds (message sizes), TLS, start and graceful stop.
- errors.py: GatewayError -> gRPC status (and a retry delay for RESOURCE_EXHAUSTED).
- auth.py: the caller, from the metadata.
- unimplemented.py: every other xAI service and method answers UNIMPLEMENTED, naming what grokgate serves.

The messages and servicer base classes are those generated from xAI's own protos, shipped in xai-sdk
(`xai_sdk.proto.v6`).
"""
