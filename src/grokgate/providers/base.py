"""The provider seam: what every backend implements, and the one registry that creates them.

One value and three protocols, each exactly what its callers use (mypy strict checks them, see pyproject.toml):

- `Call`: one request as the serving layer and the providers read it, built by the api layer (api/chat.py,
  api/responses.py) and never changed in place: the request as the client sent it (validated), whose request it
  is (`tenant`), the per-request options (cassette, cache option, conversation id) and, once admitted, the output
  cap held and the affinity keys (`dataclasses.replace` makes the admitted copy: serving/lifecycle.py). Anything
  a provider keeps beyond the request (a prompt cache, a recording) is keyed by `tenant`, so it cannot be written
  without naming whose it is.

- `Generation`: the events of one request (core/events.py), plus what the serving layer asks when it settles
  (`serving/lifecycle.py`): the backend that actually served it, its fingerprint, and the usage consumed so far
  when the request is cut short.
- `Provider`: a backend that serves a public model (the local engine, a routed model of `providers/router.py`,
  a third-party kind). The serving layer calls `check`, `prompt_copies` and `generate`; the app starts and
  stops it and reads `ready` and `status` for /readyz and the metrics.
- `Upstream`: a Provider the router drives attempt by attempt (providers/openai_compat.py, xai.py): keys and a
  breaker decide whether and where to try, and failures before the first event are `UpstreamFailure`s the
  router may retry elsewhere. The router tells the two apart by this protocol, once, when a route is built.
- `Tokenizer` and `DescribesModels`: optional capabilities of a Provider, for xAI's Tokenize and Models services
  (api/xai_info.py): the model's own tokenizer (the local engine's, xAI's `/v1/tokenize-text`) and what the backend
  knows of its model (its context length, image input). A routed model answers for the route it tries first
  (providers/router.py). A provider without them is estimated for (core/pricing.py) and given a default.

Third-party kinds register a factory under the `grokgate.providers` entry-point group; `create` finds them.
"""

from __future__ import annotations

import importlib.metadata as metadata
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypedDict, TypeVar, runtime_checkable

from grokgate.core.cassette import DEFAULT as DEFAULT_CASSETTE
from grokgate.core.errors import GatewayError
from grokgate.core.events import Event, Origin, Usage, UsageReport
from grokgate.core.response_cache import CacheOption
from grokgate.schemas.chat import ChatCompletionRequest


@dataclass(frozen=True, slots=True)
class Call:
    """One request on its way through the serving layer to a backend. Frozen: nothing downstream rewrites what the
    client sent; what the serving layer decides (the output cap held, the affinity keys) is a new value."""

    request: ChatCompletionRequest  # as received and validated; never mutated
    # Whose request this is (core/tenancy.py `tenant_of`): the scope of everything that outlives it (stored
    # responses, cached answers, cassettes, prompt caches, conversation ids).
    tenant: str
    request_id: str = ""
    started: float = 0.0  # time.perf_counter() when the request arrived
    prompt_tokens: int = 0  # an upper bound of one copy of the prompt (core/pricing.py)
    cassette: str = DEFAULT_CASSETTE  # record/replay (the x-grokgate-cassette header)
    cache: CacheOption | None = None  # the x-grokgate-cache header (None: the model's rule decides)
    conversation_id: str | None = None  # the client's x-grok-conv-id header
    # Set at admission (`admitted`): the output per choice the backend may produce (what the reservation paid for;
    # the caller's own cap when nothing was reserved), and the prompt-cache affinity keys (serving/affinity.py).
    output_cap: int | None = None
    cache_key: str | None = None  # the conversation id the upstream is told
    route_key: str | None = None  # what the router hashes to keep a conversation on one backend and key

    @property
    def output_limit(self) -> int | None:
        """The output per choice to ask the backend for: the cap held at admission, else the caller's own."""
        return self.output_cap if self.output_cap is not None else self.request.output_limit

    def admitted(self, output_cap: int | None, cache_key: str | None, route_key: str | None) -> Call:
        # The constructor, not dataclasses.replace (3 us a request on the hot path, for its generality).
        return Call(self.request, self.tenant, self.request_id, self.started, self.prompt_tokens, self.cassette,
                    self.cache, self.conversation_id,
                    output_cap if output_cap is not None else self.request.output_limit, cache_key, route_key)


def held_body(body: dict[str, Any], cap: int | None) -> dict[str, Any]:
    """An outgoing chat body (`model_dump` of the request) held to the output cap: a body without a cap gets it as
    `max_tokens`; with both fields, both carry it (an upstream that reads only `max_tokens` must not be given
    more than `max_completion_tokens`, the one reserved)."""
    if cap is None:
        return body
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = cap
        if "max_tokens" in body:
            body["max_tokens"] = cap
    else:
        body["max_tokens"] = cap
    return body


class Generation(Protocol):
    """The events of one request, ending with one `UsageReport` for the whole request when the backend has one.

    `aclose` stops the generation (the client went away, or the request ended) and frees what it holds; it may
    be called at any point, also before the first event, and more than once."""

    @property
    def backend(self) -> str:
        """The name of the backend that serves this request (a routed model's pick, once the first event came)."""

    @property
    def fingerprint(self) -> str:
        """That backend's `system_fingerprint` (backend and model build)."""

    @property
    def origin(self) -> Origin:
        """Where the answer comes from: `live` (a backend generating it now), `cache` or `replay`; billing prices
        by it (core/billing.py). Known once the first event came."""

    def usage_so_far(self) -> Usage | None:
        """What the request consumed up to now, for a request cut short (None: nothing is known to be used)."""

    def __aiter__(self) -> AsyncIterator[Event]: ...

    async def __anext__(self) -> Event: ...

    async def aclose(self) -> None: ...


class RouteStatus(TypedDict):
    backend: str
    model: str
    priority: int


class BackendStatus(TypedDict, total=False):
    """What /readyz shows of a backend, and the scrape-time metrics read (observability/metrics.py)."""

    ready: bool
    error: str | None
    # The local engine (providers/local.py).
    model: str | None
    slots: int
    slots_busy: int
    queued: int
    tokens_generated: int
    jobs_done: int
    jobs_started: int
    queue_wait_seconds: float
    # An upstream (providers/openai_compat.py): its kind, its breaker's state and each key's.
    kind: str
    state: str
    keys: list[str]
    # A routed model (providers/router.py).
    routes: list[RouteStatus]


@runtime_checkable
class Provider(Protocol):
    @property
    def name(self) -> str:
        """The backend's name in metrics, logs and the ledger."""

    @property
    def fingerprint(self) -> str:
        """Identifies the backend and model build (the response's `system_fingerprint`)."""

    def ready(self) -> bool: ...

    def status(self) -> BackendStatus: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def check(self, request: ChatCompletionRequest) -> None:
        """Refuse, with a GatewayError, what this backend cannot do (before anything is reserved or sent)."""

    def prompt_copies(self, request: ChatCompletionRequest) -> int:
        """How many times the backend may bill this request's prompt: n when it sends n single requests."""

    def generate(self, call: Call, upstream_model: str) -> Generation:
        """Start generating `call.request` (held to `call.output_limit`). Errors before any output are raised by the
        generation's first step."""


@runtime_checkable
class CountsPrompts(Protocol):
    """A backend that can count a prompt exactly before admission (the local engine: providers/local_count.py), so
    that the reservation holds what the prompt will be billed instead of the body's bound (core/pricing.py)."""

    async def count_prompt(self, call: Call, upstream_model: str) -> int | None:
        """The tokens one copy of `call`'s prompt will be billed, exactly (never fewer); None when it is not
        counted (too large to count cheaply, the backend busy or failing): the caller keeps its bound."""


class UpstreamFailure(Exception):
    """An upstream attempt failed before any output: the router decides whether to try elsewhere."""

    def __init__(self, error: GatewayError, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after


@runtime_checkable
class Upstream(Provider, Protocol):
    """A Provider the router drives one attempt at a time (retries, key rotation and fallback are the router's)."""

    def available(self, tried: set[int]) -> bool:
        """Whether an attempt can be made now: the breaker is not open and a key not in `tried` is usable."""

    def retry_in(self) -> float:
        """Seconds until a resting backend or key may be tried again."""

    async def attempt(self, call: Call, model: str, tried: set[int]) -> AsyncGenerator[Event]:
        """Send the request on one key (added to `tried`). Raises UpstreamFailure for a refusal; the returned
        events' first step raises a GatewayError if the reply breaks before its first event."""

    def succeeded(self) -> None:
        """The first event arrived: the backend's breaker counts a success."""

    def failed(self) -> None:
        """The reply broke or stalled before its first event: the breaker counts a failure."""


class Token(NamedTuple):
    """One token of a text: its id in the model's vocabulary, its bytes (a multi-byte character may be split across
    tokens: the pieces of a text, in order, are its UTF-8 bytes) and those bytes as text (U+FFFD for bytes that are
    not whole UTF-8)."""

    id: int
    piece: bytes
    text: str


@runtime_checkable
class Tokenizer(Protocol):
    """Optional: a Provider that can tokenize text exactly as its model counts a prompt."""

    async def tokenize(self, text: str, model: str) -> list[Token] | None:
        """The tokens of `text` for `model` (the upstream model id); None when this backend has no tokenizer for it
        (the caller estimates). Failures are GatewayErrors (503 while a model loads, 502/504 from an upstream)."""


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What a backend knows of a model it serves (xAI's Models API: `max_prompt_length`, `input_modalities`)."""

    context_length: int  # tokens one request may hold, prompt and output together
    images: bool = False  # whether the model takes image inputs


@runtime_checkable
class DescribesModels(Protocol):
    """Optional: a Provider that knows the context length (and modalities) of the models it serves."""

    def describe(self, model: str) -> ModelFacts | None:
        """What this backend knows of `model` (the upstream model id); None: nothing."""


class EventsGeneration:
    """A `Generation` over an async generator of events, for providers that need nothing more: it reports the
    last `UsageReport` it passed on as the usage so far."""

    def __init__(self, events: AsyncGenerator[Event], backend: str, fingerprint: str,
                 origin: Origin = "live") -> None:
        self._events = events
        self._backend = backend
        self._fingerprint = fingerprint
        self._origin: Origin = origin
        self._usage: Usage | None = None

    @property
    def backend(self) -> str:
        return self._backend

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def origin(self) -> Origin:
        return self._origin

    def usage_so_far(self) -> Usage | None:
        return self._usage

    def __aiter__(self) -> EventsGeneration:
        return self

    async def __anext__(self) -> Event:
        event = await self._events.__anext__()
        if isinstance(event, UsageReport):
            self._usage = event.usage
        return event

    async def aclose(self) -> None:
        await self._events.aclose()


ProviderFactory = Callable[..., Provider]
"""Makes a Provider (or an Upstream) from the routing file's options of a backend (routing.py)."""

_F = TypeVar("_F", bound=ProviderFactory)
_FACTORIES: dict[str, ProviderFactory] = {}
ENTRY_POINT_GROUP = "grokgate.providers"


def register(kind: str) -> Callable[[_F], _F]:
    def decorate(factory: _F) -> _F:
        _FACTORIES[kind] = factory
        return factory

    return decorate


def create(kind: str, **config: object) -> Provider:
    """Build a provider by kind; third-party kinds come from the `grokgate.providers` entry point group."""
    if kind not in _FACTORIES:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == kind:
                _FACTORIES[kind] = ep.load()
    if kind not in _FACTORIES:
        known = ", ".join(sorted(_FACTORIES)) or "none"
        raise ValueError(f"unknown provider kind {kind!r} (known: {known})")
    provider = _FACTORIES[kind](**config)
    if not isinstance(provider, Provider):  # a third-party factory that returns something else fails here, once
        raise TypeError(f"the {kind!r} provider factory returned {type(provider).__name__}, not a Provider")
    return provider


@dataclass(frozen=True, slots=True)
class Route:
    public_name: str
    provider: Provider
    upstream_model: str


class ModelTable:
    """Public model name -> the backend that serves it; `backends` are what the app starts and stops."""

    def __init__(self, routes: list[Route], backends: list[Provider] | None = None) -> None:
        self._routes = {r.public_name: r for r in routes}
        self._backends = backends

    def names(self) -> list[str]:
        return list(self._routes)

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def providers(self) -> list[Provider]:
        if self._backends is not None:
            return list(self._backends)
        unique: dict[int, Provider] = {}
        for route in self._routes.values():
            unique.setdefault(id(route.provider), route.provider)
        return list(unique.values())
