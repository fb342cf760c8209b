"""The chat-completions request, validated with AceData's ranges (contract section 1.3).

Unknown top-level fields are accepted and kept (`extra="allow"`), so upstream adapters can forward what
they understand; the local engine reads only the fields declared here.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, model_validator

from grokgate.core.errors import bad_request

Role = Literal["system", "developer", "user", "assistant", "tool"]

# Integers a client may send anywhere are bounded to what every encoder on the way can carry (orjson, the
# engines' JSON libraries): a signed 64-bit integer. api/body.py refuses the ones in free-form fields.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_TOOLS = 128  # xAI's documented maximum (and OpenAI's)
MAX_STOP = 4

# logit_bias: token ids (decimal digits) to a bias of -100..100 (OpenAI's rule).
TokenId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}$")]
Bias = Annotated[int, Field(ge=-100, le=100)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Lenient):
    name: str
    arguments: str


class ToolCall(_Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Lenient):
    role: Role
    content: str | Annotated[list[ContentPart], Field(min_length=1)] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> Message:
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise ValueError(f"content is required for a {self.role} message")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool messages need tool_call_id")
        return self

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content)


class StreamOptions(_Lenient):
    include_usage: StrictBool | None = None


class FunctionDef(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(_Lenient):
    name: str


class ToolChoiceObject(_Lenient):
    type: Literal["function"]
    function: ToolChoiceFunction


class JSONSchemaFormat(_Lenient):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = False


class ResponseFormatText(_Lenient):
    type: Literal["text"]


class ResponseFormatJSONObject(_Lenient):
    type: Literal["json_object"]


class ResponseFormatJSONSchema(_Lenient):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema, Field(discriminator="type")
]


class ChatCompletionRequest(_Lenient):
    """`POST /grok/chat/completions` body: OpenAI chat-completion fields with AceData's ranges."""

    model: str
    messages: list[Message] = Field(min_length=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stream: StrictBool | None = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | Annotated[list[str], Field(min_length=1, max_length=MAX_STOP)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream_options: StreamOptions | None = None
    parallel_tool_calls: StrictBool | None = None
    user: str | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    store: StrictBool | None = None
    metadata: dict[str, str] | None = None
    logit_bias: dict[TokenId, Bias] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | None = None
    response_format: ResponseFormat | None = None

    def check_limits(self, *, max_messages: int, max_tokens_limit: int) -> None:
        """Cross-field rules and the server's configured bounds, each naming its field."""
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
        if len(self.messages) > max_messages:
            raise bad_request(f"Too many messages: at most {max_messages} are accepted.", "messages")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value > max_tokens_limit:
                raise bad_request(f"{name} must be at most {max_tokens_limit}.", name)

    @cached_property
    def prompt_chars(self) -> int:
        """Characters of text in the prompt, for a cheap upper estimate of its tokens (each message counts
        16 more for its role and framing)."""
        total = 0
        for message in self.messages:
            total += 16
            if isinstance(message.content, str):
                total += len(message.content)
            elif message.content:
                total += sum(len(p.text) for p in message.content if isinstance(p, TextPart))
            total += sum(len(c.function.arguments) + len(c.function.name) for c in message.tool_calls or ())
        return total

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def output_limit(self) -> int | None:
        """The caller's output cap; `max_completion_tokens` wins over the deprecated `max_tokens`."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop
