"""xAI's API: the OpenAI-compatible adapter plus what xAI does differently (its request rules and its errors).

Requests are translated before they leave: `stop` becomes an array; reasoning models lose penalties and
`stop` (xAI would refuse them), grok-3 loses `presence_penalty`; `reasoning_effort` reaches only
grok-3-mini, mapped to low/high; `max_tokens` becomes `max_completion_tokens`; `developer` becomes
`system`; `logit_bias` and OpenAI-only fields are dropped; `top_logprobs` above xAI's 8 is clamped to 8.
Replies: usage is normalised to OpenAI arithmetic (core.usage), flat errors become our envelope
(openai_compat.upstream_message), `end_turn` becomes `stop` (core.completion), and `reasoning_content` and
`citations` pass through.
"""

from __future__ import annotations

from typing import Any

from grokgate.providers.base import register
from grokgate.providers.openai_compat import BackendConfig, OpenAICompatBackend
from grokgate.schemas.chat import ChatCompletionRequest

XAI_TOP_LOGPROBS_MAX = 8
OPENAI_ONLY = ("logit_bias", "service_tier", "store", "metadata", "modalities", "audio", "prediction")
# Public AceData names -> xAI model ids (configurable per route; these are the defaults).
DEFAULT_MODEL_IDS = {
    "grok-4": "grok-4-0709",
    "grok-4-1-fast": "grok-4-1-fast-reasoning",
    "grok-4-1-fast-non-reasoning": "grok-4-1-fast-non-reasoning",
    "grok-3": "grok-3",
    "grok-3-mini": "grok-3-mini",
    "grok-2-vision": "grok-2-vision-1212",
}


def is_reasoning_model(model_id: str) -> bool:
    if "non-reasoning" in model_id:
        return False
    return model_id.startswith(("grok-4", "grok-3-mini", "grok-code")) or "reasoning" in model_id


def translate(body: dict[str, Any], model_id: str) -> dict[str, Any]:
    """An OpenAI-style request body -> one xAI accepts."""
    for name in OPENAI_ONLY:
        body.pop(name, None)
    if isinstance(body.get("stop"), str):
        body["stop"] = [body["stop"]]
    if "max_tokens" in body:
        limit = body.pop("max_tokens")
        body.setdefault("max_completion_tokens", limit)
    if is_reasoning_model(model_id):
        for name in ("presence_penalty", "frequency_penalty", "stop"):
            body.pop(name, None)
    elif model_id.startswith("grok-3"):
        body.pop("presence_penalty", None)
    effort = body.pop("reasoning_effort", None)
    if effort is not None and model_id.startswith("grok-3-mini"):
        body["reasoning_effort"] = "low" if effort in ("minimal", "low") else "high"
    if body.get("top_logprobs") is not None and body["top_logprobs"] > XAI_TOP_LOGPROBS_MAX:
        body["top_logprobs"] = XAI_TOP_LOGPROBS_MAX
    for message in body.get("messages", ()):
        if message.get("role") == "developer":
            message["role"] = "system"
    return body


class XAIBackend(OpenAICompatBackend):
    kind = "xai"

    def payload(self, request: ChatCompletionRequest, upstream_model: str, stream: bool) -> dict[str, Any]:
        return translate(super().payload(request, upstream_model, stream), upstream_model)


@register("xai")
def create_xai(**config: Any) -> XAIBackend:
    config.setdefault("base_url", "https://api.x.ai/v1")
    config.setdefault("read_timeout", 3600.0)  # xAI's advice for reasoning models
    return XAIBackend(BackendConfig(**config))
