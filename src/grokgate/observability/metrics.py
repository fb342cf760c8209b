"""Prometheus metrics on their own registry. Labels are bounded: model and backend names come from the
configuration, statuses are HTTP codes; never token or request ids.

Request metrics are recorded by the serving layer, once per request where it is settled
(serving/lifecycle.py `Lifecycle.settle`); engine, backend and limiter state are read at scrape time by a
collector, so the hot path pays nothing for them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from grokgate.core.events import Usage
from grokgate.providers.base import Provider

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class _Children:
    """A labelled metric's children by their label values. prometheus_client's `labels()` checks the values and
    takes a lock on every call; the per-request metrics ask for the same few children all the time."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:  # bounded like the metric itself: one entry per child it holds
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("grokgate_requests", "Inference requests by outcome and API (chat, responses)",
                                ["model", "backend", "status", "endpoint"], registry=r)
        self.latency = Histogram("grokgate_request_duration_seconds", "Whole request duration",
                                 ["model", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_event = Histogram("grokgate_time_to_first_event_seconds", "Time until the backend's first event",
                                     ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("grokgate_overhead_seconds", "Time spent in grokgate itself before the response "
                                  "started (the x-grokgate-overhead-ms header)", buckets=OVERHEAD_BUCKETS, registry=r)
        self.tokens = Counter("grokgate_tokens", "Tokens by model and class", ["model", "kind"], registry=r)
        self.server_tool_calls = Counter("grokgate_server_tool_calls", "Server-side tool calls (xAI's web and X "
                                         "search, code execution) by model", ["model"], registry=r)
        # Per backend as well: a prompt cache belongs to the backend (and key) that served the conversation, so
        # the cache-hit share (cached / prompt) is read per model and backend (serving/affinity.py).
        self.backend_prompt = Counter("grokgate_backend_prompt_tokens", "Prompt tokens by model and the backend "
                                      "that served them (kind=prompt), and those read from its prompt cache "
                                      "(kind=cached, part of prompt)", ["model", "backend", "kind"], registry=r)
        self.credits = Counter("grokgate_credits_charged", "Micro-credits charged", ["model"], registry=r)
        self.overruns = Counter("grokgate_settlement_overruns", "Settlements whose cost exceeded their reservation "
                                "(the store then caps the charge at the balance): should stay 0", ["model"],
                                registry=r)
        self.errors = Counter("grokgate_errors", "Error responses by AceData code (any route)", ["code"], registry=r)
        # Stored responses of the Responses API (serving/responses.py): what they add, and what the purge removes.
        self.responses_stored = Counter("grokgate_responses_stored", "Responses stored for previous_response_id",
                                        registry=r)
        self.responses_stored_bytes = Counter("grokgate_responses_stored_bytes", "Bytes of JSON stored with them",
                                              registry=r)
        self.responses_not_stored = Counter("grokgate_responses_not_stored", "Responses asked to be stored but "
                                            "not kept, by reason", ["reason"], registry=r)
        self.responses_purged = Counter("grokgate_responses_purged", "Stored responses purged after retention",
                                        registry=r)
        # What the store holds now (read every minute by app.py's purge task: counting the table is not free).
        # multiprocess_mode: how `grokgate serve --workers` adds up the workers' gauges (one process: no effect).
        self.responses_kept = Gauge("grokgate_responses_kept", "Stored responses kept now", registry=r,
                                    multiprocess_mode="mostrecent")
        self.responses_kept_bytes = Gauge("grokgate_responses_kept_bytes", "Bytes of JSON they hold", registry=r,
                                          multiprocess_mode="mostrecent")
        self.in_flight = Gauge("grokgate_requests_in_flight", "Inference requests being served", registry=r,
                               multiprocess_mode="livesum")
        self.commit = Histogram("grokgate_store_commit_seconds", "Ledger/store group-commit duration",
                                buckets=OVERHEAD_BUCKETS + LATENCY_BUCKETS[4:], registry=r)
        self.commit_batch = Histogram("grokgate_store_commit_batch_size", "Operations per group commit",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)

        self._states: list[_Collector] = []
        self._workers = self._workers_registry()
        self._requests, self._latency, self._first_event = (_Children(self.requests), _Children(self.latency),
                                                            _Children(self.first_event))
        self._tokens, self._backend_prompt = _Children(self.tokens), _Children(self.backend_prompt)
        self._credits, self._server_tool_calls = _Children(self.credits), _Children(self.server_tool_calls)

    def request_started(self) -> None:
        self.in_flight.inc()

    def observe_first_event(self, model: str, seconds: float) -> None:
        self._first_event(model).observe(seconds)

    def request_ended(self, *, model: str, backend: str, status: int, stream: bool, seconds: float,
                      usage: Usage | None, charged: int, endpoint: str = "chat") -> None:
        """Once per request, when it is settled (the pair of `request_started`)."""
        self.in_flight.dec()
        self._requests(model, backend, str(status), endpoint).inc()
        self._latency(model, "true" if stream else "false").observe(seconds)
        if usage is not None:
            for kind, value in (("prompt", usage.prompt_tokens), ("cached", usage.cached_tokens),
                                ("completion", usage.completion_tokens), ("reasoning", usage.reasoning_tokens)):
                if value:
                    self._tokens(model, kind).inc(value)
            if usage.server_tool_calls:  # calls, not tokens: a counter of their own
                self._server_tool_calls(model).inc(usage.server_tool_calls)
            if usage.prompt_tokens:
                self._backend_prompt(model, backend, "prompt").inc(usage.prompt_tokens)
                if usage.cached_tokens:
                    self._backend_prompt(model, backend, "cached").inc(min(usage.cached_tokens, usage.prompt_tokens))
        if charged:
            self._credits(model).inc(charged)

    def observe_commit(self, seconds: float, size: int) -> None:
        self.commit.observe(seconds)
        self.commit_batch.observe(size)

    def add_state(self, name: str, read: Callable[[], Iterator[Metric]]) -> None:
        """Gauges computed at scrape time (engine slots, breaker states, limiter degradation)."""
        self.registry.register(_Collector(read))
        self._states.append(_Collector(read))

    def render(self) -> bytes:
        if self._workers is None:
            return generate_latest(self.registry)
        return generate_latest(self._workers)

    def _workers_registry(self) -> CollectorRegistry | None:
        """Under `grokgate serve --workers` (grokgate/workers.py), PROMETHEUS_MULTIPROC_DIR names the run's
        directory, where prometheus_client keeps every worker's values in files: a scrape of any worker adds up
        all of them (those of workers already replaced too: counters never go back). The scrape-time state
        (engine slots, breakers) is this worker's own."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return None
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(_Collector(lambda: (m for c in self._states for m in c.collect())))
        return registry


class _Collector(Collector):
    def __init__(self, read: Callable[[], Iterator[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield from self._read()

    def describe(self) -> Iterator[Metric]:
        return iter(())


def backend_state(providers: Sequence[Provider], limiter: object) -> Callable[[], Iterator[Metric]]:
    def read() -> Iterator[Metric]:
        slots = GaugeMetricFamily("grokgate_local_slots", "Local engine slots", labels=["state"])
        queued = GaugeMetricFamily("grokgate_local_queued_jobs", "Local engine jobs waiting for a slot")
        generated = CounterMetricFamily("grokgate_local_tokens_generated", "Tokens generated by the local engine")
        started = CounterMetricFamily("grokgate_local_jobs_started", "Local engine jobs (one per choice) started")
        waited = CounterMetricFamily("grokgate_local_queue_wait_seconds",
                                     "Seconds jobs waited for a slot, summed (divide by jobs started for the mean)")
        breaker = GaugeMetricFamily("grokgate_backend_open", "1 while a backend's breaker is open or half open",
                                    labels=["backend"])
        cooling = GaugeMetricFamily("grokgate_backend_keys_cooling", "Upstream keys resting after failures",
                                    labels=["backend"])
        for provider in providers:
            status = provider.status()
            if "slots" in status:
                slots.add_metric(["busy"], status["slots_busy"])
                slots.add_metric(["total"], status["slots"])
                queued.add_metric([], status["queued"])
                generated.add_metric([], status["tokens_generated"])
                started.add_metric([], status["jobs_started"])
                waited.add_metric([], status["queue_wait_seconds"])
            if "state" in status:
                breaker.add_metric([provider.name], 0 if status["state"] == "closed" else 1)
                cooling.add_metric([provider.name], sum(1 for s in status.get("keys", ()) if s != "closed"))
        yield from (slots, queued, generated, started, waited, breaker, cooling)
        degraded_total = getattr(limiter, "degraded_total", None)  # a limiter with a shared store counts these
        if isinstance(degraded_total, int):
            degraded = CounterMetricFamily("grokgate_rate_limiter_degraded",
                                           "Rate-limit decisions made without the shared store")
            degraded.add_metric([], degraded_total)
            yield degraded

    return read
