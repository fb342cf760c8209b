"""The chat-completions request, validated with AceData's ranges (temperature 0..2, top_p 0..1, n 1..128, ...).

Unknown top-level fields are accepted and kept (`extra="allow"`), so upstream adapters can forward what
they understand; the local engine reads only the fields declared here.

The JSON schema (the OpenAPI document's `ChatCompletionRequest`: `openapi_schema` with the server's settings)
states every rule the server enforces on a body, so a body valid by the document is refused only for what the
document lists (an unknown model, credits, rate limits): each role's required fields, `top_logprobs` needing
`logprobs`, the configured bounds on `messages` and the output tokens, integers in free-form values within
int64, and numbers that are JSON numbers (not booleans or numeric strings). tests/test_chat_schema.py holds
the schema and the validation together. Validation stays one model per message with one check after it: a
union tagged by `role` would name the tag in its errors (`messages[0].tool.content`), changing the messages
and `param` paths clients see, for no gain in speed.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StrictBool,
    StrictFloat,
    StringConstraints,
    model_validator,
)
from pydantic.json_schema import DEFAULT_REF_TEMPLATE, GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import CoreSchema
from pydantic_core import core_schema as cs

from grokgate.core.errors import bad_request

Role = Literal["system", "developer", "user", "assistant", "tool"]

# Integers a client may send anywhere are bounded to what every encoder on the way can carry (orjson, the
# engines' JSON libraries): a signed 64-bit integer. api/body.py refuses the ones in free-form fields.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_TOOLS = 128  # xAI's documented maximum (and OpenAI's)
MAX_STOP = 4
# Content parts and tool calls, all messages together, per message allowed (max_messages of them): counted on the
# raw body before validation (api/body.py), for chat and the Responses API alike.
ITEMS_PER_MESSAGE = 4
# A conversation id (`prompt_cache_key`, the `x-grok-conv-id` header): xAI's examples are UUIDs, OpenAI refuses
# more than 64 characters; this bound only keeps a client from sending kilobytes of it on every request.
MAX_CACHE_KEY = 256
CacheKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CACHE_KEY)]


class JsonInt:
    """An integer as JSON Schema's `integer` means it: a JSON number without a fraction (`2`, also `2.0`), not
    a boolean or a numeric string, which pydantic's lax `int` takes and its strict `int` refuses `2.0`. Pure
    pydantic-core: an integer is checked by the union's first member, as fast as a plain `int`.

    `Annotated[int, JsonInt(ge, le)]`; the bounds are inclusive."""

    def __init__(self, ge: int, le: int | None = None) -> None:
        self.ge, self.le = ge, le

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return cs.union_schema([
            cs.int_schema(strict=True, ge=self.ge, le=self.le),
            cs.chain_schema([cs.float_schema(strict=True), cs.int_schema(ge=self.ge, le=self.le)]),
        ], mode="left_to_right")

    def __get_pydantic_json_schema__(self, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema: dict[str, Any] = {"type": "integer", "minimum": self.ge}
        if self.le is not None:
            schema["maximum"] = self.le
        return schema


# logit_bias: token ids (decimal digits) to a bias of -100..100 (OpenAI's rule).
TokenId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}$")]
Bias = Annotated[int, JsonInt(-100, 100)]


class _Lenient(BaseModel):
    # Extra fields are kept; the schema bounds them as any JSON (`model_json_schema` below).
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


def _without_null(field: dict[str, Any]) -> dict[str, Any]:
    """An optional field's schema (`anyOf: [..., {"type": "null"}]`, a default) as a required value's."""
    branches = [b for b in field["anyOf"] if b != {"type": "null"}]
    kept = {k: v for k, v in field.items() if k not in ("anyOf", "default")}
    return {**kept, **branches[0]} if len(branches) == 1 else {**kept, "anyOf": branches}


# One schema per way a message is valid; `Message._content_required` is the same rule in code, and
# tests/test_chat_schema.py holds the two together.
_ROLE_VARIANTS: tuple[tuple[str, str, str], ...] = (
    # (title, role, the field that must be there; "content" may not be null, the other two may not be empty)
    ("SystemMessage", "system", "content"),
    ("DeveloperMessage", "developer", "content"),
    ("UserMessage", "user", "content"),
    ("AssistantMessage", "assistant", "content"),
    ("AssistantToolCallMessage", "assistant", "tool_calls"),
    ("AssistantRefusalMessage", "assistant", "refusal"),
    ("ToolMessage", "tool", "content"),
)


def _message_variants(schema: dict[str, Any]) -> None:
    """Message's schema as `anyOf` its valid shapes: `content` for every role, or for an assistant message
    instead a non-empty `tool_calls` or `refusal`; a tool message also a non-empty `tool_call_id`. The shapes
    overlap (an assistant message may have content and tool calls), hence `anyOf`, not `oneOf`."""
    fields: dict[str, Any] = schema.pop("properties")
    required_value = {
        "content": _without_null(fields["content"]),
        "tool_calls": {**_without_null(fields["tool_calls"]), "minItems": 1},
        "refusal": {**_without_null(fields["refusal"]), "minLength": 1},
    }
    tool_call_id = {**_without_null(fields["tool_call_id"]), "minLength": 1}
    variants = []
    for title, role, needed in _ROLE_VARIANTS:
        properties = {**fields, "role": {"const": role}, needed: required_value[needed]}
        required = ["role", needed]
        if role == "tool":
            properties["tool_call_id"] = tool_call_id
            required.append("tool_call_id")
        variants.append({"title": title, "type": "object", "properties": properties, "required": required,
                         "additionalProperties": True})
    schema.pop("required", None)
    schema.pop("type", None)
    schema.pop("additionalProperties", None)
    schema["anyOf"] = variants


class Message(_Lenient):
    """One message. Every role needs `content` (not null), except an assistant message with non-empty
    `tool_calls` or `refusal` instead; a tool message also needs a non-empty `tool_call_id`."""

    model_config = ConfigDict(json_schema_extra=_message_variants)

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


JSON_VALUE = "JsonValue"


def _json_value(ref: dict[str, Any]) -> dict[str, Any]:
    """Any JSON value whose integers are int64s (a number with a fraction may be anything)."""
    return {"title": JSON_VALUE, "description": f"Any JSON value; integers between {INT64_MIN} and {INT64_MAX}",
            "anyOf": [{"type": ["string", "boolean", "null"]},
                      {"type": "number", "not": {"type": "integer"}},
                      {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
                      {"type": "array", "items": ref},
                      {"type": "object", "additionalProperties": ref}]}


def _bound_free_form(schema: Any, any_json: dict[str, Any]) -> None:
    """Every `additionalProperties: true` (a lenient model's extra fields, a `dict[str, Any]`) becomes
    `additionalProperties: JsonValue`, in place."""
    if isinstance(schema, dict):
        if schema.get("additionalProperties") is True:
            schema["additionalProperties"] = any_json
        for value in schema.values():
            _bound_free_form(value, any_json)
    elif isinstance(schema, list):
        for item in schema:
            _bound_free_form(item, any_json)


def _request_rules(schema: dict[str, Any]) -> None:
    """What `check_limits` enforces across fields, and what pydantic's schema leaves out."""
    # `top_logprobs` (a number, not null) needs `logprobs: true`.
    schema["if"] = {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}}
    schema["then"] = {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}
    # `deferred: true` cannot be streamed.
    schema["not"] = {"required": ["deferred", "stream"],
                     "properties": {"deferred": {"const": True}, "stream": {"const": True}}}
    # logit_bias keys are token ids: pydantic's schema names their pattern but lets other keys through.
    for branch in schema["properties"]["logit_bias"]["anyOf"]:
        if branch.get("type") == "object":
            branch["additionalProperties"] = False


class ChatCompletionRequest(_Lenient):
    """`POST /grok/chat/completions` body: OpenAI chat-completion fields with AceData's ranges. `top_logprobs`
    requires `logprobs: true`."""

    model_config = ConfigDict(json_schema_extra=_request_rules)

    model: str
    messages: list[Message] = Field(min_length=1)
    n: Annotated[int, JsonInt(1, 128)] | None = None
    stream: StrictBool | None = False
    max_tokens: Annotated[int, JsonInt(1)] | None = None
    max_completion_tokens: Annotated[int, JsonInt(1)] | None = None
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, ge=0, le=1)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2)
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2, le=2)
    seed: Annotated[int, JsonInt(INT64_MIN, INT64_MAX)] | None = None
    stop: str | Annotated[list[str], Field(min_length=1, max_length=MAX_STOP)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[int, JsonInt(0, 20)] | None = None
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
    # OpenAI's conversation key for its prompt cache; xAI's Chat Completions reads the same id from the
    # `x-grok-conv-id` header, its Responses API from this field (providers/xai.py maps it).
    prompt_cache_key: CacheKey | None = None
    # xAI's deferred completion: answer `{"request_id"}` at once, the completion later from
    # `GET /v1/chat/deferred-completion/{request_id}` (serving/deferred.py). grokgate's own: never forwarded
    # (excluded from every dump, so from upstream bodies, cassettes and cache keys).
    deferred: StrictBool | None = Field(default=None, exclude=True)

    def check_limits(self, *, max_messages: int, max_tokens_limit: int) -> None:
        """Cross-field rules and the server's configured bounds, each naming its field."""
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
        if self.deferred and self.stream:
            raise bad_request("A deferred request cannot be streamed: deferred and stream: true exclude each other.",
                              "deferred")
        if len(self.messages) > max_messages:
            raise bad_request(f"Too many messages: at most {max_messages} are accepted.", "messages")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value > max_tokens_limit:
                raise bad_request(f"{name} must be at most {max_tokens_limit}.", name)

    @classmethod
    def model_json_schema(cls, by_alias: bool | None = None, ref_template: str = DEFAULT_REF_TEMPLATE,
                          schema_generator: type[GenerateJsonSchema] = GenerateJsonSchema,
                          mode: JsonSchemaMode = "validation", *,
                          union_format: Literal["any_of", "primitive_type_array"] = "any_of") -> dict[str, Any]:
        """Pydantic's schema, and free-form values (unknown fields, tool parameters, JSON schemas) bounded as
        api/body.py `check_integers` bounds them: any JSON whose integers fit in int64. The `$ref` needs
        `ref_template`, which only this call knows."""
        schema = super().model_json_schema(by_alias, ref_template, schema_generator, mode, union_format=union_format)
        any_json = {"$ref": ref_template.format(model=JSON_VALUE)}
        _bound_free_form(schema, any_json)
        schema["$defs"][JSON_VALUE] = _json_value(any_json)
        return schema

    @classmethod
    def openapi_schema(cls, max_messages: int, max_tokens_limit: int,
                       ref_template: str = "#/components/schemas/{model}") -> dict[str, Any]:
        """The JSON schema with the server's configured bounds (`check_limits`): at most `max_messages`
        messages, at most `max_tokens_limit` for `max_tokens` and `max_completion_tokens`. Shaped as
        `model_json_schema`'s: the models it refers to are under `$defs`."""
        schema = cls.model_json_schema(ref_template=ref_template)
        properties = schema["properties"]
        properties["messages"]["maxItems"] = max_messages
        for name in ("max_tokens", "max_completion_tokens"):
            for branch in properties[name]["anyOf"]:
                if branch.get("type") == "integer":
                    branch["maximum"] = max_tokens_limit
        return schema

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
    def responses_body(self) -> dict[str, Any] | None:
        """The request in the Responses API's wire format, for a backend that speaks it natively (providers/xai.py
        sends it to xAI's /v1/responses), with the whole conversation in `input`. None for a chat request; a
        request of the Responses API is translated to chat fields for every other backend (schemas/responses.py
        `ResponsesChatRequest` overrides this)."""
        return None

    @property
    def server_tools(self) -> list[str]:
        """The types of the server-side tools asked for (xAI's `web_search`, `x_search`, `code_interpreter`...):
        only a backend that runs them may take the request. Chat requests have none."""
        return []

    def server_tool_calls(self, ceiling: int) -> int:
        """How many server-side tool calls this request may run, so reserves: the Responses body's
        `max_tool_calls` when it is between 1 and `ceiling` (settings.max_server_tool_calls), else `ceiling`; none
        without server tools. xAI is sent the same figure (providers/xai.py)."""
        if not self.server_tools:
            return 0
        asked = (self.responses_body or {}).get("max_tool_calls")
        return asked if isinstance(asked, int) and not isinstance(asked, bool) and 1 <= asked <= ceiling else ceiling

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


CONVERSATION_HEADER = "x-grok-conv-id"


def conversation_header(value: str | None) -> str | None:
    """The client's `x-grok-conv-id` header, checked like `prompt_cache_key` (400 naming the header)."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > MAX_CACHE_KEY:
        raise bad_request(f"The {CONVERSATION_HEADER} header must hold 1 to {MAX_CACHE_KEY} characters.",
                          CONVERSATION_HEADER)
    return value
