"""The Responses API request (`POST /v1/responses`), validated like the chat body (schemas/chat.py): AceData's
ranges (temperature 0..2, top_p 0..1, `max_output_tokens` >= 1), unknown fields kept, every error a 400 naming
its `param` (`input[3].content[0].image_url`).

Field names and shapes follow openai-python's `src/openai/types/responses/` (`response_create_params.py`,
`response_input_item_param.py`, `function_tool_param.py`). A request is translated to a chat request for every
backend (serving/responses.py); `ResponsesChatRequest` is that translation, and also carries the native body for a
backend that speaks the Responses API itself (providers/xai.py).

Tagged unions use a callable discriminator whose tags hold a dash (`item-message`): api/errors.py leaves such
segments out of `param`, so an error names `input[0].content`, not `input[0].message.content`. Item and tool
types grokgate does not serve get a model of their own that refuses them with a clear message; the published
schema (`openapi_schema`) leaves those models out, so it states exactly what is accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)
from pydantic.json_schema import DEFAULT_REF_TEMPLATE, GenerateJsonSchema, JsonSchemaMode

from grokgate.core.errors import bad_request
from grokgate.schemas.chat import (
    INT64_MAX,
    ITEMS_PER_MESSAGE,
    JSON_VALUE,
    MAX_CACHE_KEY,
    MAX_TOOLS,
    ChatCompletionRequest,
    JsonInt,
    _bound_free_form,
    _json_value,
    _Lenient,
)

# Content parts (message content and function outputs) allowed per input item on average, all items together:
# chat's bound per message (api/body.py counts both before validation).
ITEMS_PER_ITEM = ITEMS_PER_MESSAGE
MAX_METADATA_KEYS = 16  # OpenAI's rule: at most 16 pairs, keys of at most 64 characters, values of at most 512

# Items passed through as the backend made them (xAI's reasoning with its encrypted content, server-side tool
# calls): a chat backend leaves them out of the prompt, xAI's own Responses API receives them.
PASS_THROUGH_ITEMS = ("reasoning", "web_search_call", "x_search_call", "code_interpreter_call", "code_execution_call",
                      "file_search_call", "mcp_call", "mcp_list_tools", "collections_search_call")
# Server-side tools (run by the backend, not the client): only a route that runs them takes the request.
SERVER_TOOLS = ("web_search", "web_search_preview", "x_search", "code_interpreter", "code_execution", "file_search",
                "mcp", "collections_search")

_UNSUPPORTED = "Unsupported"  # the title prefix of the refusing models, left out of the published schema


def _kind(value: Any, default: str | None) -> str | None:
    kind = value.get("type", default) if isinstance(value, dict) else getattr(value, "type", default)
    if kind is None:
        return default
    return kind if isinstance(kind, str) else ""


def _tagger(prefix: str, known: dict[str, str], default: str | None) -> Discriminator:
    """A discriminator on `type`: the model's tag for a known type, `<prefix>-unsupported` for any other."""
    def tag(value: Any) -> str:
        kind = _kind(value, default)
        return known.get(kind, f"{prefix}-unsupported") if kind is not None else f"{prefix}-unsupported"
    return Discriminator(tag)


class _Refused(_Lenient):
    """Refuses any value with the message of `_why` (a type grokgate does not serve)."""

    @classmethod
    def _why(cls, kind: str) -> str:
        raise NotImplementedError

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, value: Any) -> Any:
        raise ValueError(cls._why(str(_kind(value, None) or "")))


# -- content parts ---------------------------------------------------------------------------------------------


class InputText(_Lenient):
    type: Literal["input_text"]
    text: str


class InputImage(_Lenient):
    """An image by URL (https or a data: URL). Images by `file_id` are refused: grokgate has no files API."""

    type: Literal["input_image"]
    image_url: str
    detail: Literal["auto", "low", "high"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _by_url(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("image_url") is None and value.get("file_id") is not None:
            raise ValueError("input_image needs image_url: images by file_id are not supported (no files API)")
        return value


class OutputText(_Lenient):
    type: Literal["output_text"]
    text: str


class RefusalPart(_Lenient):
    type: Literal["refusal"]
    refusal: str


class UnsupportedPart(_Refused):
    @classmethod
    def _why(cls, kind: str) -> str:
        return (f"content parts of type '{kind}' are not supported; use input_text, input_image (image_url), "
                "output_text or refusal")


ContentPart = Annotated[
    Annotated[InputText, Tag("part-input_text")] | Annotated[InputImage, Tag("part-input_image")]
    | Annotated[OutputText, Tag("part-output_text")] | Annotated[RefusalPart, Tag("part-refusal")]
    | Annotated[UnsupportedPart, Tag("part-unsupported")],
    _tagger("part", {k: f"part-{k}" for k in ("input_text", "input_image", "output_text", "refusal")}, None),
]
OutputPart = Annotated[
    Annotated[InputText, Tag("part-input_text")] | Annotated[InputImage, Tag("part-input_image")]
    | Annotated[UnsupportedPart, Tag("part-unsupported")],
    _tagger("part", {k: f"part-{k}" for k in ("input_text", "input_image")}, None),
]

# -- input items -----------------------------------------------------------------------------------------------


class MessageItem(_Lenient):
    """A message; `type` may be left out (OpenAI's EasyInputMessage)."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[ContentPart], Field(min_length=1)]
    id: str | None = None


class FunctionCallItem(_Lenient):
    """A function call the model made in an earlier turn (sent back with its output)."""

    type: Literal["function_call"]
    call_id: Annotated[str, StringConstraints(min_length=1)]
    name: str
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(_Lenient):
    """The client's result of a function call."""

    type: Literal["function_call_output"]
    call_id: Annotated[str, StringConstraints(min_length=1)]
    output: str | Annotated[list[OutputPart], Field(min_length=1)]
    id: str | None = None


class PassThroughItem(_Lenient):
    """Reasoning and server-side tool-call items, kept as given."""

    type: Literal[PASS_THROUGH_ITEMS]  # type: ignore[valid-type]
    id: str | None = None


class UnsupportedItem(_Refused):
    @classmethod
    def _why(cls, kind: str) -> str:
        if kind == "item_reference":
            return ("item_reference items are not supported: send the items themselves, or continue a stored "
                    "conversation with previous_response_id")
        return f"input items of type '{kind}' are not supported"


_ITEM_TAGS = {"message": "item-message", "function_call": "item-function_call",
              "function_call_output": "item-function_call_output", **{k: "item-pass" for k in PASS_THROUGH_ITEMS}}
InputItem = Annotated[
    Annotated[MessageItem, Tag("item-message")] | Annotated[FunctionCallItem, Tag("item-function_call")]
    | Annotated[FunctionCallOutputItem, Tag("item-function_call_output")]
    | Annotated[PassThroughItem, Tag("item-pass")] | Annotated[UnsupportedItem, Tag("item-unsupported")],
    _tagger("item", _ITEM_TAGS, "message"),
]

# -- tools, tool choice, text format, reasoning ----------------------------------------------------------------


class FunctionTool(_Lenient):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class ServerTool(_Lenient):
    """A server-side tool, kept as given (its options are the backend's business)."""

    type: Literal[SERVER_TOOLS]  # type: ignore[valid-type]


class UnsupportedTool(_Refused):
    @classmethod
    def _why(cls, kind: str) -> str:
        return f"tools of type '{kind}' are not supported; use function tools or {', '.join(SERVER_TOOLS)}"


Tool = Annotated[
    Annotated[FunctionTool, Tag("tool-function")] | Annotated[ServerTool, Tag("tool-server")]
    | Annotated[UnsupportedTool, Tag("tool-unsupported")],
    _tagger("tool", {"function": "tool-function", **{k: "tool-server" for k in SERVER_TOOLS}}, None),
]


class FunctionToolChoice(_Lenient):
    type: Literal["function"]
    name: str


def _choice_tag(value: Any) -> str:
    return "choice-function" if isinstance(value, dict | FunctionToolChoice) else "choice-mode"


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("choice-mode")]
    | Annotated[FunctionToolChoice, Tag("choice-function")],
    Discriminator(_choice_tag),
]


class FormatText(_Lenient):
    type: Literal["text"]


class FormatJSONObject(_Lenient):
    type: Literal["json_object"]


class FormatJSONSchema(_Lenient):
    type: Literal["json_schema"]
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: StrictBool | None = None


class UnsupportedFormat(_Refused):
    @classmethod
    def _why(cls, kind: str) -> str:
        return f"text formats of type '{kind}' are not supported; use text, json_object or json_schema"


TextFormat = Annotated[
    Annotated[FormatText, Tag("format-text")] | Annotated[FormatJSONObject, Tag("format-json_object")]
    | Annotated[FormatJSONSchema, Tag("format-json_schema")]
    | Annotated[UnsupportedFormat, Tag("format-unsupported")],
    _tagger("format", {k: f"format-{k}" for k in ("text", "json_object", "json_schema")}, None),
]


class TextConfig(_Lenient):
    format: TextFormat | None = None


Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class ReasoningConfig(_Lenient):
    effort: Effort | None = None


MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]

# -- the request -----------------------------------------------------------------------------------------------


class ResponsesRequest(_Lenient):
    """`POST /v1/responses` (and `/grok/responses`) body."""

    model: str
    input: Annotated[list[InputItem], Field(min_length=1)]  # a string is one user message (`_one_message`)
    instructions: str | None = None
    previous_response_id: str | None = None
    store: StrictBool | None = True
    stream: StrictBool | None = False
    max_output_tokens: Annotated[int, JsonInt(1)] | None = None
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, ge=0, le=1)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)] | None = None
    user: str | None = None
    max_tool_calls: Annotated[int, JsonInt(1, INT64_MAX)] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: Annotated[int, JsonInt(0, 20)] | None = None

    @field_validator("input", mode="before", json_schema_input_type=str | Annotated[list[InputItem],
                                                                                    Field(min_length=1)])
    @classmethod
    def _one_message(cls, value: Any) -> Any:
        """A string is one user message. Done before validation, so an error in a list names its item
        (`input[0].role`), not the string branch of a union."""
        return [{"type": "message", "role": "user", "content": value}] if isinstance(value, str) else value

    @property
    def keep(self) -> bool:
        """Whether the response is to be stored (`store` defaults to true; null is the default)."""
        return self.store is not False

    def check_limits(self, *, max_messages: int, max_tokens_limit: int) -> None:
        """The server's configured bounds, each naming its field (api/body.py refuses over-long lists before
        validation; this holds the same bounds for a body that reached validation)."""
        if len(self.input) > max_messages:
            raise bad_request(f"Too many input items: at most {max_messages} are accepted.", "input")
        limit = ITEMS_PER_ITEM * max_messages
        parts = 0
        for i, item in enumerate(self.input):
            field = "content" if isinstance(item, MessageItem) else "output"
            value = getattr(item, field, None) if isinstance(item, MessageItem | FunctionCallOutputItem) else None
            if isinstance(value, list) and (parts := parts + len(value)) > limit:
                raise bad_request(f"Too many content parts: at most {limit} are accepted in all input items "
                                  "together.", f"input[{i}].{field}")
        if self.max_output_tokens is not None and self.max_output_tokens > max_tokens_limit:
            raise bad_request(f"max_output_tokens must be at most {max_tokens_limit}.", "max_output_tokens")
        self.cache_key()

    def cache_key(self) -> str | None:
        """`prompt_cache_key`, the conversation id xAI's Responses API routes its prompt cache by (OpenAI's too).
        Kept among the unknown fields, so the native body carries it as sent; checked here like chat's."""
        value = (self.model_extra or {}).get("prompt_cache_key")
        if value is None:
            return None
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_CACHE_KEY:
            raise bad_request(f"prompt_cache_key must be a string of 1 to {MAX_CACHE_KEY} characters.",
                              "prompt_cache_key")
        return value

    @classmethod
    def model_json_schema(cls, by_alias: bool | None = None, ref_template: str = DEFAULT_REF_TEMPLATE,
                          schema_generator: type[GenerateJsonSchema] = GenerateJsonSchema,
                          mode: JsonSchemaMode = "validation", *,
                          union_format: Literal["any_of", "primitive_type_array"] = "any_of") -> dict[str, Any]:
        """Pydantic's schema without the refusing models, tagged unions as `anyOf` (the variants are told apart
        by `type`, which a message item may leave out), free-form values bounded to int64 integers as in
        schemas/chat.py."""
        schema = super().model_json_schema(by_alias, ref_template, schema_generator, mode, union_format=union_format)
        refused = {name for name in schema["$defs"] if name.startswith(_UNSUPPORTED)}
        refs = {ref_template.format(model=name) for name in refused}
        for name in refused:
            del schema["$defs"][name]
        _drop_refs(schema, refs)
        any_json = {"$ref": ref_template.format(model=JSON_VALUE)}
        _bound_free_form(schema, any_json)
        schema["$defs"][JSON_VALUE] = _json_value(any_json)
        return schema

    @classmethod
    def openapi_schema(cls, max_messages: int, max_tokens_limit: int,
                       ref_template: str = "#/components/schemas/{model}") -> dict[str, Any]:
        """The JSON schema with the server's configured bounds (`check_limits`): at most `max_messages` input
        items, each with at most `ITEMS_PER_ITEM * max_messages` content parts, `max_output_tokens` at most
        `max_tokens_limit`. Shaped as `model_json_schema`'s: the models it refers to are under `$defs`."""
        schema = cls.model_json_schema(ref_template=ref_template)
        for branch in schema["properties"]["input"]["anyOf"]:
            if branch.get("type") == "array":
                branch["maxItems"] = max_messages
                # A conversation needs something to answer: a message, a call or a call's output (the others,
                # reasoning and server-side tool items, only accompany them). Without `previous_response_id` the
                # server refuses a list of none (400, `input`).
                branch["contains"] = {"anyOf": [{"$ref": ref_template.format(model=name)} for name in (
                    "MessageItem", "FunctionCallItem", "FunctionCallOutputItem")]}
        for branch in schema["properties"]["max_output_tokens"]["anyOf"]:
            if branch.get("type") == "integer":
                branch["maximum"] = max_tokens_limit
        parts = ITEMS_PER_ITEM * max_messages
        defs = schema["$defs"]
        for name, field in (("MessageItem", "content"), ("FunctionCallOutputItem", "output")):
            for branch in defs[name]["properties"][field]["anyOf"]:
                if branch.get("type") == "array":
                    branch["maxItems"] = parts
        return schema


def _drop_refs(schema: Any, refs: set[str]) -> None:
    """Remove `{"$ref": <a refused model>}` from every `oneOf`/`anyOf`, and make `oneOf`s `anyOf`s, in place."""
    if isinstance(schema, dict):
        for key in ("oneOf", "anyOf"):
            branches = schema.get(key)
            if isinstance(branches, list):
                kept = [b for b in branches if not (isinstance(b, dict) and b.get("$ref") in refs)]
                del schema[key]
                schema["anyOf"] = kept
        schema.pop("discriminator", None)
        for value in schema.values():
            _drop_refs(value, refs)
    elif isinstance(schema, list):
        for item in schema:
            _drop_refs(item, refs)


class ResponsesChatRequest(ChatCompletionRequest):
    """A Responses API request translated to chat fields (serving/responses.py builds it with `model_validate`, so
    chat's own rules apply), with the native body for xAI's /v1/responses and the server-side tools asked for."""

    _native: dict[str, Any] | None = PrivateAttr(default=None)
    _server_tools: list[str] = PrivateAttr(default_factory=list)

    @property
    def responses_body(self) -> dict[str, Any] | None:
        """The client's body with `input` the whole conversation as items (the stored chain, then this turn; the
        instructions as a leading system message), without `previous_response_id`, and `store: false`: grokgate
        keeps the conversation, the backend keeps nothing. providers/xai.py sets the model, the stream flag and
        the reserved output cap."""
        return self._native

    @property
    def server_tools(self) -> list[str]:
        return self._server_tools

    def attach(self, native: dict[str, Any], server_tools: list[str]) -> ResponsesChatRequest:
        self._native = native
        self._server_tools = server_tools
        return self
