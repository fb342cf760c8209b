"""What every backend implements, and the one registry that creates them (built-in or third-party)."""

from __future__ import annotations

import importlib.metadata as metadata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from grokgate.core.events import Event
from grokgate.schemas.chat import ChatCompletionRequest


class Generation(Protocol):
    """The events of one request. `aclose` stops the generation (the client went away) and frees its slot."""

    def __aiter__(self) -> AsyncIterator[Event]: ...

    async def __anext__(self) -> Event: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Provider(Protocol):
    name: str

    @property
    def fingerprint(self) -> str:
        """Identifies the backend and model build (the response's `system_fingerprint`)."""

    def ready(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def check(self, request: ChatCompletionRequest) -> None:
        """Refuse, with a GatewayError, what this backend cannot do (before anything is sent)."""

    def generate(self, request: ChatCompletionRequest, upstream_model: str) -> Generation: ...


ProviderFactory = Callable[..., Any]  # a Provider, or an upstream backend the router drives

_FACTORIES: dict[str, ProviderFactory] = {}
ENTRY_POINT_GROUP = "grokgate.providers"


def register(kind: str) -> Callable[[ProviderFactory], ProviderFactory]:
    def decorate(factory: ProviderFactory) -> ProviderFactory:
        _FACTORIES[kind] = factory
        return factory

    return decorate


def create(kind: str, **config: Any) -> Any:
    """Build a provider by kind; third-party kinds come from the `grokgate.providers` entry point group."""
    if kind not in _FACTORIES:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == kind:
                _FACTORIES[kind] = ep.load()
    if kind not in _FACTORIES:
        known = ", ".join(sorted(_FACTORIES)) or "none"
        raise ValueError(f"unknown provider kind {kind!r} (known: {known})")
    return _FACTORIES[kind](**config)


@dataclass(frozen=True, slots=True)
class Route:
    public_name: str
    provider: Provider
    upstream_model: str


class ModelTable:
    """Public model name -> the backend that serves it; `backends` are what the app starts and stops."""

    def __init__(self, routes: list[Route], backends: list[Any] | None = None) -> None:
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
