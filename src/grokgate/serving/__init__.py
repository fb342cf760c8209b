"""The serving layer: one request's life, shared by every wire format (docs/architecture.md, "The serving layer").

- lifecycle.py: `Serving.serve` and the per-request `Lifecycle` (admission, generation, first event, stream or
  collect, disconnects, settlement exactly once, metrics, the log line).
- wire.py: the protocols a wire format implements (renderers, framing).
- chat.py: the chat-completions wire format.
- pump.py: reading a generation with a deadline per event.

It may import core/, schemas/, providers/ (the protocols of providers/base.py, and the request shape helpers)
and observability/; never api/ nor any HTTP framework, and never a store: accounts come in through the
admission protocol (core/admission.py).
"""

from grokgate.providers.base import Call
from grokgate.serving.lifecycle import ABANDONED, Abandoned, CallOptions, Collected, Serving, Streamed

__all__ = ["ABANDONED", "Abandoned", "Call", "CallOptions", "Collected", "Serving", "Streamed"]
