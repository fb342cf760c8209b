"""What the routes need, wired once by create_app() and reached through `request.app.state`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.requests import Request

from grokgate.core.admission import Admission
from grokgate.observability.metrics import Metrics
from grokgate.providers.base import ModelTable
from grokgate.settings import Settings
from grokgate.store.sql import SqlStore


@dataclass
class Gateway:
    settings: Settings
    admission: Admission
    models: ModelTable
    store: SqlStore | None = None
    metrics: Metrics = field(default_factory=Metrics)
    started_at: int = field(default_factory=lambda: int(time.time()))


async def gateway(request: Request) -> Gateway:
    # async on purpose: FastAPI runs a plain `def` dependency in a thread pool, a thread hop per request.
    gw: Gateway = request.app.state.gateway
    return gw
