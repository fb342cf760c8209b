"""create_app(): the one place that wires concrete classes together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Route as StarletteRoute

from grokgate import __version__, routing
from grokgate.api import (
    account,
    admin,
    admin_accounts,
    chat,
    console,
    deferred,
    errors,
    ledger,
    meta,
    responses,
    xai_routes,
)
from grokgate.api.deps import Gateway
from grokgate.api.docs import mount_docs, mount_home
from grokgate.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from grokgate.api.openapi import describe_api
from grokgate.api.sse import RESPONSES_SSE
from grokgate.core.admission import Admission, StaticKeyAdmission
from grokgate.core.billing import AccountAdmission, BillingPolicy
from grokgate.core.limits import RateLimiter
from grokgate.core.pricing import default_prices
from grokgate.core.response_cache import CacheRule, ResponseCacheStore
from grokgate.core.responses import ResponseStore
from grokgate.observability.metrics import Metrics, backend_state
from grokgate.providers import base, recording
from grokgate.providers.base import ModelTable, Provider, Route
from grokgate.providers.cassette_tenants import carry_over
from grokgate.providers.model_files import CATALOG
from grokgate.rpc import chat as rpc_chat
from grokgate.rpc import info as rpc_info
from grokgate.rpc.server import RpcServer
from grokgate.runtime import tune_gc
from grokgate.server import derive_max_connections
from grokgate.serving import Serving
from grokgate.serving.deferred import Deferred
from grokgate.serving.response_cache import ResponseCache
from grokgate.serving.responses import ResponsesService
from grokgate.settings import Settings
from grokgate.store.deployment import RedisDeployment, static_deployment_id
from grokgate.store.engine_options import with_pooler
from grokgate.store.limits_memory import MemoryRateLimiter
from grokgate.store.limits_redis import RedisRateLimiter
from grokgate.store.response_cache_memory import MemoryResponseCache
from grokgate.store.response_cache_redis import RedisResponseCache
from grokgate.store.responses_memory import MemoryResponseStore
from grokgate.store.responses_sql import SqlResponseStore
from grokgate.store.sql import SqlStore, default_url

log = logging.getLogger("grokgate")

DESCRIPTION = """The Grok Chat Completions API as AceData Cloud serves it: `POST /grok/chat/completions` with a
bearer token, OpenAI chat-completion bodies and SSE streaming. Errors use the envelope
`{"error": {"code", "message", "type", "param"}, "trace_id"}`; every response carries `x-request-id`."""


def local_options(settings: Settings) -> dict[str, object]:
    """The local engine's configuration (providers/local.py LocalEngine)."""
    return {"model_path": settings.model_path, "catalog_model": CATALOG[settings.local_model],
            "cache_dir": settings.cache_dir, "threads": settings.threads, "slots": settings.slots,
            "ctx_per_slot": settings.ctx_per_slot, "slot_prompt_similarity": settings.slot_prompt_similarity,
            "prompt_cache_ram_mib": settings.prompt_cache_ram_mib, "shared_prompt_cache": settings.prompt_cache_shared}


def build_routing(settings: Settings, local_engine: Callable[[], Provider] | None = None) -> ModelTable:
    """The routing file if there is one; else xAI when a key is set; else the local engine for every name.
    `local_engine`: builds the local backend in place of loading the model in this process (a worker of
    `grokgate serve --workers`: grokgate/workers_engine.py)."""
    import grokgate.providers.local
    import grokgate.providers.openai_compat
    import grokgate.providers.xai  # noqa: F401  (each registers its kind)

    def local() -> Provider:
        if local_engine is not None:
            return local_engine()
        engine: Provider = base.create("local", **local_options(settings))
        return engine

    config = routing.load(settings.config, settings.environment()) if settings.config else None
    config = config or routing.default_config(settings)
    if config is not None:
        return routing.build(config, settings, local)
    engine = local()
    return ModelTable([Route(name, engine, name) for name in settings.models])


def wrap_recording(settings: Settings, models: ModelTable, metrics: Metrics) -> ModelTable:
    """Record every public name's requests, or replay them (providers/recording.py); else `models` as it is."""
    bounds = recording.CassetteBounds(shared=settings.cassettes_shared, max_bytes=settings.max_cassette_bytes,
                                      max_dir_bytes=settings.max_cassette_dir_bytes)
    for directory in (settings.record_dir, settings.replay_dir):
        if directory is not None:  # a token's cassettes from before accounts move to its account's directory
            carry_over(directory)
    if settings.record_dir is not None:
        return recording.record_models(models, settings.record_dir, bounds, registry=metrics.registry)
    if settings.replay_dir is not None:
        live = models if settings.record_missing else None
        return recording.replay_models(settings.models, settings.replay_dir, bounds, timing=settings.replay_timing,
                                       live=live, registry=metrics.registry)
    return models


def create_app(
    settings: Settings | None = None,
    *,
    admission: Admission | None = None,
    models: ModelTable | None = None,
    accounts: Callable[[Settings, RedisDeployment | None], tuple[AccountAdmission, SqlStore]] | None = None,
) -> FastAPI:
    """`accounts`: builds the admission and store in place of `build_accounts` (a worker of `grokgate serve
    --workers` on SQLite: grokgate/workers_sqlite.py)."""
    settings = settings or Settings()
    if models is None:
        # Pure replay builds no backend: no local engine is loaded and no upstream key is needed.
        pure_replay = settings.replay_dir is not None and not settings.record_missing
        models = ModelTable([]) if pure_replay else build_routing(settings)
    metrics = Metrics()
    models = wrap_recording(settings, models, metrics)
    # Limits and cached answers in Redis, under the deployment's own id (known at start: store/deployment.py).
    redis = RedisDeployment(settings.redis_url, settings.redis_key_prefix) if settings.redis_url else None
    store = None
    if admission is None and settings.accounts:
        admission, store = (accounts or build_accounts)(settings, redis)
    admission = admission or StaticKeyAdmission(settings.api_keys)
    # Replaying answers from cassettes, in their recorded order: a cache in front would repeat the first one (and
    # read the routing file pure replay does without).
    response_cache = None if settings.replay_dir else build_response_cache(settings, metrics, redis)
    serving = Serving(admission, models, metrics, keepalive=settings.keepalive_seconds,
                      max_server_tool_calls=settings.max_server_tool_calls,
                      server_tool_input_tokens=settings.server_tool_input_tokens,
                      affinity=settings.prompt_cache_affinity, shared_prompt_cache=settings.prompt_cache_shared,
                      response_cache=response_cache)
    # Stored responses live in the accounts database; with accounts off, in this process's memory.
    stored: ResponseStore = (SqlResponseStore(store)
                             if store is not None
                             else MemoryResponseStore(max_bytes=settings.memory_responses_bytes))
    responses_service = ResponsesService(
        stored, metrics, RESPONSES_SSE, retention_ms=int(settings.responses_retention_days * 86_400_000),
        max_stored_bytes=settings.max_stored_response_bytes, max_chain_bytes=settings.max_chain_bytes,
        max_messages=settings.max_messages)
    # Deferred chat completions keep their results beside the stored responses (shared by replicas with accounts).
    deferred_service = Deferred(serving, stored, retention_ms=int(settings.deferred_retention_seconds * 1000),
                                max_pending=settings.deferred_max_pending,
                                timeout_s=settings.deferred_timeout_seconds,
                                max_result_bytes=settings.max_stored_response_bytes)
    gw = Gateway(settings=settings, admission=admission, models=models, serving=serving,
                 responses=responses_service, store=store, metrics=metrics, deferred=deferred_service)
    gw.metrics.add_state("backends", backend_state(models.providers(), getattr(gw.admission, "limiter", None)))
    if store is not None:
        store.on_commit = gw.metrics.observe_commit
    rpc = build_rpc(settings, gw)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if store is not None:
            await store.open(serve=True)
            await store.seed_prices(default_prices(models.names(), settings.credits_per_usd))
            # Whatever an earlier run of this instance held when it died is released before new traffic.
            await store.reclaim(owner=store.owner, older_than_ms=settings.reservation_lease_seconds * 1000)
        if redis is not None:
            await redis.start(settings.deployment_id
                              or (store.deployment_id if store is not None else None)
                              or static_deployment_id(settings.api_keys))
        for provider in gw.models.providers():
            await provider.start()
        if rpc is not None:
            await rpc.start()  # on this event loop, beside uvicorn's server
        untune = tune_gc() if settings.tune_gc else None
        purging = asyncio.create_task(purge_responses(stored, metrics, settings.responses_purge_seconds,
                                                      settings.responses_measure_seconds))
        try:
            yield
        finally:
            if rpc is not None:
                await rpc.stop()  # RPCs in flight finish (or settle as cut short) before the backends close
            # Deferred requests still running are stopped and settled (billed what they consumed), their failure
            # kept, while the backends and the store are still open; the first event's wait bounds the grace.
            await deferred_service.close(grace_s=settings.keepalive_seconds + 5)
            purging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purging
            if untune is not None:
                untune()
            for provider in gw.models.providers():
                await provider.close()
            if store is not None:
                await store.close()
            if response_cache is not None:
                await response_cache.close()
            limiter = getattr(gw.admission, "limiter", None)
            if limiter is not None:
                await limiter.close()

    app = FastAPI(
        title="grokgate",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by _mount_docs, under the docs' security headers
        # No redirect to the path with(out) a trailing slash: Starlette builds its Location from the Host
        # header, which any client sets. Such a path answers 404 in the envelope.
        redirect_slashes=False,
        lifespan=lifespan,
        # FastAPI's built-in OpenTelemetry hooks probe the environment on every request (5% of the hot path in
        # a profile); grokgate's metrics are its own.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.gateway = gw
    errors.install(app)
    app.include_router(chat.router)
    app.include_router(responses.router)
    app.include_router(meta.router)
    app.include_router(xai_routes.router)  # xAI's REST twins of Models, Tokenize, Auth
    app.include_router(deferred.router)  # GET .../chat/deferred-completion/{request_id}
    if store is not None:
        app.include_router(account.router)
        app.include_router(admin.router)
        app.include_router(admin_accounts.router)
        app.include_router(ledger.router)
        app.include_router(console.router)  # the web console at /console (static files)
    mount_docs(app)
    mount_home(app, console=store is not None)
    describe_api(app, settings)
    # The chat routes are also served by plain Starlette routes placed first: the same endpoint, minus
    # FastAPI's per-request machinery (route wrappers, exit stacks, empty dependency solving). The FastAPI
    # routes stay registered behind them, for the OpenAPI document.
    app.router.routes[0:0] = [StarletteRoute(p, chat.chat_completions, methods=["POST"]) for p in chat.PATHS] + [
        StarletteRoute(p, responses.create_response, methods=["POST"]) for p in responses.PATHS]
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost: even a 413 carries x-request-id
    return app


async def purge_responses(stored: ResponseStore, metrics: Metrics, every: float, measure_every: float = 60.0) -> None:
    """Delete expired stored responses, now and then every `every` seconds, for as long as the app runs; and
    every `measure_every` seconds set the gauges of what the store holds."""
    next_purge = 0.0
    while True:
        try:
            if time.monotonic() >= next_purge:
                next_purge = time.monotonic() + every
                metrics.responses_purged.inc(await stored.purge(int(time.time() * 1000)))
            kept, size = await stored.stats()
            metrics.responses_kept.set(kept)
            metrics.responses_kept_bytes.set(size)
        except Exception:  # a database hiccup must not end the loop; the next round retries
            log.exception("purging or measuring stored responses failed")
        await asyncio.sleep(min(every, measure_every))


def build_rpc(settings: Settings, gw: Gateway) -> RpcServer | None:
    """xAI's native gRPC API (src/grokgate/rpc) on settings.grpc_port; None when it is 0."""
    if not settings.grpc_port:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)  # raised to the hard limit by `grokgate serve` already
    connections = settings.max_connections or max(1, derive_max_connections(soft) // 2)
    return RpcServer(settings.host, settings.grpc_port, [rpc_chat.register(gw), rpc_info.register(gw)],
                     max_receive_bytes=settings.max_body_bytes, tls_cert=settings.grpc_tls_cert,
                     tls_key=settings.grpc_tls_key, max_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
                     max_streams=settings.grpc_max_streams_per_connection, max_connections=connections,
                     handshake_seconds=settings.header_timeout_seconds)


def build_response_cache(settings: Settings, metrics: Metrics,
                         redis: RedisDeployment | None = None) -> ResponseCache | None:
    """The exact response cache for the models the routing file opts in (none: no cache, no lookups): in Redis
    when one is configured (shared by the deployment's replicas, under its prefix and id), else in memory."""
    specs = routing.cache_rules(settings)
    if not specs:
        return None
    rules = {model: CacheRule(ttl=spec.ttl, max_ttl=spec.longest, cache_sampled=spec.cache_sampled, scope=spec.scope)
             for model, spec in specs.items()}
    store: ResponseCacheStore
    if redis is not None:
        url = redis.url
        store = redis.cache_store(lambda prefix: RedisResponseCache(
            url, key_prefix=f"{prefix}cache:", max_connections=settings.redis_max_connections,
            pool_timeout=settings.redis_pool_timeout_seconds))
    else:
        store = MemoryResponseCache(settings.response_cache_memory_bytes)
    return ResponseCache(store, rules, metrics, max_entry_bytes=settings.response_cache_max_entry_bytes)


def build_accounts(settings: Settings, redis: RedisDeployment | None = None) -> tuple[AccountAdmission, SqlStore]:
    store = SqlStore(with_pooler(settings.database_url or default_url(settings.data_dir), settings.database_pooler),
                     owner=settings.instance(),
                     writer_process=settings.sqlite_writer == "process",
                     heartbeat_seconds=settings.instance_heartbeat_seconds,
                     dead_after_seconds=settings.instance_dead_after_seconds,
                     synchronous_commit=settings.database_synchronous_commit)
    limiter: RateLimiter
    if redis is not None:
        url = redis.url
        limiter = redis.limiter(lambda prefix: RedisRateLimiter(
            url, on_store_error=settings.rate_limit_store_error,
            max_connections=settings.redis_max_connections, pool_timeout=settings.redis_pool_timeout_seconds,
            key_prefix=prefix))
    else:
        limiter = MemoryRateLimiter()
    # A request without an output cap is held to this reservation, so it must itself be a valid cap.
    policy = BillingPolicy(default_output_reservation=min(settings.default_output_reservation,
                                                          settings.max_tokens_limit),
                           server_tool_call_price=settings.server_tool_call_price,
                           cache_hit_price=settings.response_cache_hit_price,
                           replay_price_factor=settings.replay_price_factor)
    return AccountAdmission(store, limiter, settings.api_keys, policy), store
