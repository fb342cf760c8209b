"""The one settings object. Nothing else in grokgate reads the environment."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODELS = (
    "grok-4",
    "grok-4-1-fast",
    "grok-4-1-fast-non-reasoning",
    "grok-3",
    "grok-3-mini",
    "grok-2-vision",
)


def _xdg(var: str, fallback: str) -> Path:
    base = os.environ.get(var) or str(Path.home() / fallback)
    return Path(base) / "grokgate"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every knob, read from `GROKGATE_*` environment variables (or passed in by the CLI and tests)."""

    model_config = SettingsConfigDict(env_prefix="GROKGATE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    # xAI's native gRPC API (src/grokgate/rpc: what xai-sdk speaks), on the same host, in the same process and event
    # loop as HTTP: plaintext, or TLS when a certificate and its key are given (PEM files). 0 turns it off.
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    grpc_tls_cert: Path | None = None
    grpc_tls_key: Path | None = None
    # The gRPC port's own bounds (rpc/server.py): RPCs in flight at once (past it: RESOURCE_EXHAUSTED at once), and
    # HTTP/2 streams per connection. Connections, idle and handshake times follow the HTTP server's settings.
    grpc_max_concurrent_rpcs: int = Field(default=4096, ge=1, le=1_000_000)
    grpc_max_streams_per_connection: int = Field(default=100, ge=1, le=100_000)

    # Bearer tokens accepted by the minimal admission step (comma-separated in the environment).
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Public model names, all served by the local engine until routing is configured.
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_MODELS))

    # Routing: a YAML file of backends and models (docs/configuration.md). Without one: xAI when an xAI key is
    # set, else the local engine.
    config: Path | None = None
    xai_api_key: str | None = Field(default=None, validation_alias=AliasChoices("GROKGATE_XAI_API_KEY", "XAI_API_KEY"))
    xai_base_url: str = "https://api.x.ai/v1"

    # Embedded engine: `model_path`, any GGUF file, wins over `local_model`, a catalog model assembled from its
    # PyPI parts (providers/model_files.py).
    model_path: Path | None = None
    local_model: str = "qwen2.5-coder-0.5b"
    threads: int = Field(default=1, ge=1, le=256)
    slots: int = Field(default=4, ge=1, le=256)
    # Prompt-cache affinity on the engine when its prompt cache is shared (`shared_prompt_cache`, below): a request
    # goes to the idle slot whose cached prompt shares the largest part of its own (above this share; 0: least
    # recently used), and prompts evicted from slots are kept in host memory up to `prompt_cache_ram_mib` for a later
    # turn to restore (llama.cpp's defaults; 0 turns it off). Per tenant (the default with several tenants), grokgate
    # picks the slot itself (providers/local_slots.py) and the similarity is unused; prompts evicted from slots are
    # saved for their own tenant only, in files up to `prompt_cache_ram_mib` in all (on tmpfs when it has room;
    # providers/local_cache.py; 0 turns it off).
    slot_prompt_similarity: float = Field(default=0.1, ge=0, le=1)
    prompt_cache_ram_mib: int = Field(default=8192, ge=0, le=1_048_576)
    ctx_per_slot: int = Field(default=4096, ge=256, le=1_048_576)

    cache_dir: Path = Field(default_factory=lambda: _xdg("XDG_CACHE_HOME", ".cache"))
    data_dir: Path = Field(default_factory=lambda: _xdg("XDG_DATA_HOME", ".local/share"))

    # Request bounds.
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_messages: int = Field(default=2048, ge=1)
    max_tokens_limit: int = Field(default=131_072, ge=1)

    # Streaming: a `: keep-alive` comment after this many seconds of silence.
    keepalive_seconds: float = Field(default=10.0, gt=0)

    log_level: str = "INFO"

    # Freeze startup objects out of the garbage collector and collect less often (grokgate.runtime).
    tune_gc: bool = True

    # SQLite: commit settlements in a child process (own GIL) or in a thread of the serving process.
    sqlite_writer: Literal["process", "thread"] = "process"

    # Accounts: tokens, credits, prices, ledger, rate limits. Off: GROKGATE_API_KEYS alone, no billing.
    accounts: bool = True
    # SQLAlchemy URL; default: SQLite in data_dir. `postgresql://...` for several replicas.
    database_url: str | None = None
    # PostgreSQL: whether a settlement's or reservation's commit waits for the WAL to reach the disk. Off (the
    # default), like SQLite's WAL with synchronous=NORMAL: nothing is lost when a replica is killed, and a crash of
    # PostgreSQL itself may lose its last ~3 x wal_writer_delay of them, whole (docs/operations.md: the books stay
    # exact; those requests go unbilled). On: each group commit waits for its fsync.
    database_synchronous_commit: bool = False
    # What sits between grokgate and PostgreSQL: `pgbouncer` (transaction or session mode) turns off the drivers'
    # prepared-statement caches, which a transaction-mode pooler breaks (store/engine_options.py).
    database_pooler: Literal["none", "pgbouncer"] = "none"
    # With Redis, rate limits hold across replicas; without it they are per process. `redis://host:port/db`, or
    # a Redis Cluster: `redis+cluster://host:port[,host:port...]` (`rediss+cluster://` with TLS); any node will
    # do, the others are found from it (store/redis_client.py).
    redis_url: str | None = None
    rate_limit_store_error: Literal["fail_open", "fail_closed"] = "fail_closed"
    credits_per_usd: float = Field(default=1.0, gt=0)
    # Output tokens reserved per choice when a request sets no max_tokens.
    default_output_reservation: int = Field(default=4096, ge=1)
    # Names this process's reservations, so a restart can release what a crash left held.
    # Default: host name and port, so two processes on one host never release each other's reservations.
    instance_id: str | None = None
    # Reservations of any instance older than this are released (a replica that never came back).
    reservation_lease_seconds: int = Field(default=3600, ge=60)
    # Each live instance renews a heartbeat this often; the living release the reservations of an instance
    # whose heartbeat is older than `instance_dead_after_seconds` (a replica killed and rescheduled under a
    # new instance id).
    instance_heartbeat_seconds: float = Field(default=10.0, gt=0, le=300)
    instance_dead_after_seconds: float = Field(default=45.0, gt=0, le=3600)
    # Redis connection pool of the rate limiter: requests wait up to the timeout for a free connection.
    redis_max_connections: int = Field(default=64, ge=1, le=10_000)
    redis_pool_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    # Prefix of the Redis keys of limits and cached answers, followed by the deployment's id (deployment_id below),
    # so deployments sharing one Redis database never share them; give each deployment its own prefix all the same
    # (a shared one is warned at start). No braces: the keys' {hash tag} follows it.
    redis_key_prefix: str = Field(default="grokgate:rl:", min_length=1, max_length=64, pattern=r"^[^{}\s]+$")

    # The Responses API (serving/responses.py). Stored responses are kept this many days (xAI keeps 30), then
    # purged every `responses_purge_seconds`; one stored response (input items + response) is at most
    # `max_stored_response_bytes` of JSON (a larger one is answered but not stored: `store` comes back false), and
    # a `previous_response_id` chain rebuilds at most `max_chain_bytes` of conversation.
    responses_retention_days: float = Field(default=30.0, gt=0, le=3650)
    responses_purge_seconds: float = Field(default=3600.0, gt=0, le=86_400)
    responses_measure_seconds: float = Field(default=60.0, gt=0, le=86_400)  # the stored-responses gauges
    max_stored_response_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=1024**3)
    max_chain_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=1024**3)
    # Accounts off: stored responses live in memory, at most this many bytes (oldest dropped first).
    memory_responses_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=1024**4)
    # Deferred chat completions (serving/deferred.py): results are kept this long (xAI keeps 24 h) in the stored
    # responses' store (memory_responses_bytes bounds them with accounts off; a result is at most
    # max_stored_response_bytes); one tenant may have at most `deferred_max_pending` running in a process (429
    # past it); a deferred request runs at most `deferred_timeout_seconds` (then it fails with 504, billed what it
    # consumed).
    deferred_retention_seconds: float = Field(default=86_400.0, gt=0, le=30 * 86_400)
    deferred_max_pending: int = Field(default=20, ge=1, le=100_000)
    deferred_timeout_seconds: float = Field(default=1800.0, gt=0, le=86_400)
    # Server-side tools (xAI's web search, X search, code execution) are charged per call, in micro-credits, and a
    # request reserves `max_server_tool_calls` of them (sent upstream as `max_tool_calls` when the client sets none).
    server_tool_call_price: int = Field(default=25_000, ge=0, le=10**12)
    max_server_tool_calls: int = Field(default=10, ge=1, le=1000)
    # What a server-side tool call feeds back into the model (search results, code output), billed by xAI as input
    # tokens: a request with server-side tools reserves this many more prompt tokens per call it may make.
    server_tool_input_tokens: int = Field(default=20_000, ge=0, le=10**7)

    # Prompt-cache affinity on upstreams (serving/affinity.py): a conversation keeps one id, backend and key.
    prompt_cache_affinity: bool = True

    # Tenants (docs/operations.md, "Running for many tenants"): every token is a tenant, and nothing one leaves
    # behind is seen by another. A single-tenant deployment may share prompt caches instead: clients' conversation
    # ids then go upstream as sent (not namespaced by tenant), and the local engine reuses a cached prompt prefix
    # whoever sent it (llama.cpp's own slot choice and host-memory prompt cache). Default (None): shared only where
    # there is one tenant, accounts off with at most one API key (`prompt_cache_shared`).
    shared_prompt_cache: bool | None = None
    # Cassettes (docs/replay.md): `tenant`, each tenant records into and replays from cassettes of its own, or
    # `shared`, one set for every caller (record with one key, replay in CI with another). Default: `shared` with
    # accounts off (GROKGATE_API_KEYS are one team's), `tenant` with accounts on.
    cassette_scope: Literal["tenant", "shared"] | None = None
    # Bounds of recording: one cassette file, and all the cassettes of one directory together (a tenant's own, or
    # the shared one). A request that would record past them is refused with a clear error, and counted.
    max_cassette_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=1024**4)
    max_cassette_dir_bytes: int = Field(default=1024**3, ge=1024, le=1024**5)
    # The deployment's identity in shared stores (Redis keys of limits and cached answers). Default: the one kept in
    # the accounts database (made at its first migration), so replicas of one database share it and two databases
    # on one Redis never do; with accounts off, a digest of GROKGATE_API_KEYS' key ids.
    deployment_id: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    # A request body larger than this is parsed in a worker thread rather than on the event loop, after the
    # caller was found able to be served (api/body.py).
    parse_offload_bytes: int = Field(default=256 * 1024, ge=1024, le=1024**3)

    @property
    def prompt_cache_shared(self) -> bool:
        if self.shared_prompt_cache is not None:
            return self.shared_prompt_cache
        return not self.accounts and len(self.api_keys) <= 1

    @property
    def cassettes_shared(self) -> bool:
        return self.cassette_scope == "shared" if self.cassette_scope is not None else not self.accounts

    # The exact response cache (serving/response_cache.py; models opt in with the routing file's `cache:`): in
    # Redis when redis_url is set, else in this process's memory, at most `response_cache_memory_bytes`; an answer
    # above `response_cache_max_entry_bytes` is not kept. A hit is billed by `response_cache_hit_price`:
    # `cached_input` (the prompt at the cached-input price, no output), `input`, `full` or `free`.
    response_cache_memory_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=1024**4)
    response_cache_max_entry_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=512 * 1024 * 1024)
    response_cache_hit_price: Literal["cached_input", "input", "full", "free"] = "cached_input"

    # HTTP server bounds (grokgate.server): what one client can hold before a request reaches the app.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_header_count: int = Field(default=100, ge=8, le=10_000)
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    body_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    # Open connections in all and per client address; 0 = derived from the process's descriptor limit.
    max_connections: int = Field(default=0, ge=0, le=1_000_000)
    max_connections_per_client: int = Field(default=256, ge=1, le=1_000_000)
    # Stopping (grokgate.drain): after a SIGTERM, /readyz answers 503 "draining" for `drain_seconds` while requests
    # are still served (so a load balancer's health check takes this server out first; 0: stop accepting at once);
    # then requests in flight, streams included, get `graceful_timeout_seconds` to finish before they are cancelled.
    drain_seconds: float = Field(default=5.0, ge=0, le=3600)
    graceful_timeout_seconds: float = Field(default=5.0, ge=0, le=86_400)

    # /metrics: `loopback` (open to 127.0.0.1/::1 only), `open`, `token` (Bearer metrics_token), or `off`.
    metrics_access: Literal["loopback", "open", "token", "off"] = "loopback"
    metrics_token: str | None = None

    # Record and replay (docs/replay.md, providers/recording.py): record every request that reaches a backend into
    # cassettes in `record_dir`, or answer from the cassettes in `replay_dir` (a miss goes live and is appended
    # with `record_missing`); `replay_timing`: at once, or with the recorded gaps between events. Replays are
    # billed at the recorded usage times `replay_price_factor` (0: free, 1: as if live).
    record_dir: Path | None = None
    replay_dir: Path | None = None
    record_missing: bool = False
    replay_timing: Literal["instant", "recorded"] = "instant"
    replay_price_factor: int = Field(default=1, ge=0, le=1)

    @staticmethod
    def environment() -> dict[str, str]:
        """The environment, for `api_key_env` references in the routing file (read here and nowhere else)."""
        return dict(os.environ)

    def instance(self) -> str:
        return self.instance_id or f"{socket.gethostname()}:{self.port}"

    @field_validator("api_keys", "models", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("local_model")
    @classmethod
    def _in_catalog(cls, value: str) -> str:
        from grokgate.providers.model_files import CATALOG

        if value not in CATALOG:
            raise ValueError(f"unknown local model {value!r}; the catalog has {', '.join(CATALOG)}")
        return value

    @field_validator("models")
    @classmethod
    def _models_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one public model name is required")
        return value

    @model_validator(mode="after")
    def _metrics_token_given(self) -> Settings:
        if self.metrics_access == "token" and not (self.metrics_token or "").strip():
            raise ValueError("GROKGATE_METRICS_ACCESS=token needs a non-empty GROKGATE_METRICS_TOKEN")
        return self

    @model_validator(mode="after")
    def _grpc_tls_pair(self) -> Settings:
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("GROKGATE_GRPC_TLS_CERT and GROKGATE_GRPC_TLS_KEY go together")
        return self

    @model_validator(mode="after")
    def _deferred_within_lease(self) -> Settings:
        # A running deferred request holds its reservation; another instance starting up frees reservations older
        # than the lease, so a request that may run longer could overspend its token meanwhile. And a result kept
        # for less than a request's pending row would let a finished request answer "pending" again.
        if self.deferred_timeout_seconds >= self.reservation_lease_seconds:
            raise ValueError("GROKGATE_DEFERRED_TIMEOUT_SECONDS must be below GROKGATE_RESERVATION_LEASE_SECONDS")
        if self.deferred_retention_seconds < self.deferred_timeout_seconds + 60:
            raise ValueError("GROKGATE_DEFERRED_RETENTION_SECONDS must be at least "
                             "GROKGATE_DEFERRED_TIMEOUT_SECONDS + 60")
        return self

    @model_validator(mode="after")
    def _record_or_replay(self) -> Settings:
        if self.record_dir is not None and self.replay_dir is not None:
            raise ValueError("GROKGATE_RECORD_DIR and GROKGATE_REPLAY_DIR exclude each other (with "
                             "GROKGATE_RECORD_MISSING, a replay appends its misses to GROKGATE_REPLAY_DIR)")
        if self.record_missing and self.replay_dir is None:
            raise ValueError("GROKGATE_RECORD_MISSING needs GROKGATE_REPLAY_DIR")
        return self
