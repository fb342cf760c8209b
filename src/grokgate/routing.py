"""The routing file (`grokgate.yaml`): backends and, per public model, ordered routes.

```yaml
backends:
  xai:
    kind: xai                        # xai | openai | local
    api_key_env: [XAI_KEY_A, XAI_KEY_B]   # environment variable names; several keys rotate
  vllm:
    kind: openai
    base_url: http://gpu-box:8000/v1
    fanout_n: true                   # the server ignores n: send n requests and merge
  local:
    kind: local
models:
  grok-4:
    - {backend: xai, model: grok-4-0709}
    - {backend: local, priority: 1}  # fallback
cache:                               # the exact response cache, opt-in per public model (docs/configuration.md)
  grok-4: {ttl: 600}                 # also max_ttl, cache_sampled, scope: principal | global
```
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from grokgate.providers.base import ModelTable, Route, create
from grokgate.providers.xai import DEFAULT_MODEL_IDS
from grokgate.settings import Settings


class ConfigError(ValueError):
    """The routing file is wrong; the message lists every problem with its location."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendSpec(_Strict):
    kind: Literal["xai", "openai", "local"]
    base_url: str | None = None
    api_keys: list[str] = Field(default_factory=list, description="literal keys (prefer api_key_env)")
    api_key_env: str | list[str] | None = None
    timeout: float = Field(default=600.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float | None = Field(default=None, gt=0)
    max_in_flight: int = Field(default=256, ge=1)
    fanout_n: bool = False
    cooldown: float = Field(default=30.0, gt=0)
    failure_threshold: int = Field(default=3, ge=1)
    # Send the conversation id (serving/affinity.py) as `prompt_cache_key`: for upstreams that read it (OpenAI).
    prompt_cache_key: bool = False

    @model_validator(mode="after")
    def _url(self) -> BackendSpec:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("an openai backend needs base_url")
        return self


class RouteSpec(_Strict):
    backend: str
    model: str | None = Field(default=None, description="the upstream model id (default: the public name)")
    priority: int = 0
    weight: int = Field(default=1, ge=1)


class CacheSpec(_Strict):
    """A model's opt-in to the exact response cache (core/response_cache.py CacheRule: the same fields)."""

    ttl: int = Field(default=600, ge=1, le=30 * 86_400)
    max_ttl: int | None = Field(default=None, ge=1, le=30 * 86_400, description="default: max(ttl, 3600)")
    cache_sampled: bool = False
    scope: Literal["principal", "global"] = "principal"

    @model_validator(mode="after")
    def _bounds(self) -> CacheSpec:
        if self.max_ttl is not None and self.ttl > self.max_ttl:
            raise ValueError(f"ttl ({self.ttl}) must not exceed max_ttl ({self.max_ttl})")
        return self

    @property
    def longest(self) -> int:
        return self.max_ttl if self.max_ttl is not None else max(self.ttl, 3600)


class GatewayConfig(_Strict):
    backends: dict[str, BackendSpec]
    models: dict[str, list[RouteSpec]] = Field(min_length=1)
    cache: dict[str, CacheSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        problems = []
        for model, routes in self.models.items():
            if not routes:
                problems.append(f"models.{model}: needs at least one route")
            for i, route in enumerate(routes):
                if route.backend not in self.backends:
                    known = ", ".join(self.backends) or "none"
                    problems.append(f"models.{model}[{i}].backend: unknown backend {route.backend!r} (known: {known})")
        for model in self.cache:
            if model not in self.models:
                problems.append(f"cache.{model}: not a model of this file (models: {', '.join(self.models)})")
        if "cache" in self.backends:  # the ledger's and metrics' name for answers replayed from the cache
            problems.append("backends.cache: the name 'cache' is reserved for the response cache")
        if sum(1 for b in self.backends.values() if b.kind == "local") > 1:
            problems.append("backends: at most one backend of kind local")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def parse(text: str, env: Mapping[str, str], source: str = "config") -> GatewayConfig:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    try:
        config = GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg'].removeprefix('Value error, ')}"
                 for e in exc.errors()]
        raise ConfigError(f"{source}: {len(lines)} problem(s):\n" + "\n".join(lines)) from None
    missing = []
    for name, backend in config.backends.items():
        names = [backend.api_key_env] if isinstance(backend.api_key_env, str) else backend.api_key_env or []
        for var in names:
            if not env.get(var):
                missing.append(f"  backends.{name}.api_key_env: environment variable {var} is not set")
            else:
                backend.api_keys.append(env[var])
        if backend.kind == "xai" and not backend.api_keys:
            missing.append(f"  backends.{name}: an xai backend needs an API key (api_key_env)")
    if missing:
        raise ConfigError(f"{source}: {len(missing)} problem(s):\n" + "\n".join(missing))
    return config


def load(path: Path, env: Mapping[str, str]) -> GatewayConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(text, env, str(path))


def cache_rules(settings: Settings) -> dict[str, CacheSpec]:
    """The routing file's `cache:` section (none without a file): the models whose answers are cached."""
    if not settings.config:
        return {}
    return load(settings.config, settings.environment()).cache


def default_config(settings: Settings) -> GatewayConfig | None:
    """No file: the seed models go to xAI when a key is set; None means the local engine serves them."""
    if not settings.xai_api_key:
        return None
    return GatewayConfig(
        backends={"xai": BackendSpec(kind="xai", base_url=settings.xai_base_url, api_keys=[settings.xai_api_key])},
        models={name: [RouteSpec(backend="xai", model=DEFAULT_MODEL_IDS.get(name, name))] for name in settings.models},
    )


def build(config: GatewayConfig, settings: Settings, local_factory: Any) -> ModelTable:
    from grokgate.providers.router import Candidate, RoutedModel

    backends: dict[str, Any] = {}
    for name, spec in config.backends.items():
        if spec.kind == "local":
            backends[name] = local_factory()
            continue
        options: dict[str, Any] = {
            "name": name, "api_keys": spec.api_keys, "timeout": spec.timeout,
            "connect_timeout": spec.connect_timeout, "max_in_flight": spec.max_in_flight,
            "fanout_n": spec.fanout_n, "cooldown": spec.cooldown, "failure_threshold": spec.failure_threshold,
            "prompt_cache_key": spec.prompt_cache_key,
            # What a request's reservation paid for (serving/lifecycle.py): xAI is sent no higher max_tool_calls.
            "max_server_tool_calls": settings.max_server_tool_calls,
        }
        if spec.base_url:
            options["base_url"] = spec.base_url
        if spec.read_timeout:
            options["read_timeout"] = spec.read_timeout
        backends[name] = create(spec.kind, **options)
    routes = []
    for public, specs in config.models.items():
        candidates = [
            Candidate(backends[r.backend], r.model or _default_model(public, config.backends[r.backend].kind),
                      r.priority, r.weight)
            for r in specs
        ]
        deadline = max((config.backends[r.backend].timeout for r in specs), default=600.0)
        routes.append(Route(public, RoutedModel(public, candidates, deadline), public))
    return ModelTable(routes, backends=list(backends.values()))


def _default_model(public: str, kind: str) -> str:
    return DEFAULT_MODEL_IDS.get(public, public) if kind == "xai" else public
