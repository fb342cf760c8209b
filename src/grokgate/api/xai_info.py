"""xAI's Models, Tokenize and Auth services, once for both wire formats: the gRPC servicers (rpc/info.py) and their
REST twins (api/xai_routes.py) call these and only render the result. No HTTP framework here.

Models (`language_models`, `language_model`): the public model names the caller may use (a token's
`allowed_models`), each with grokgate's current price from the store, in xAI's unit, and its context length.

- Prices: xAI's fields are USD cents per 100 million tokens (docs.x.ai REST reference, `LanguageModel`), which is
  USD ticks per token (1 tick = 1e-10 USD, the unit of `cost_in_usd_ticks`); `search_price` is ticks per search.
  grokgate's prices are micro-credits per million tokens (core/pricing.py), turned into USD by
  GROKGATE_CREDITS_PER_USD: ticks per token = micro-credits / (100 x credits per USD), rounded up, so a client that
  computes a cost from them never finds less than grokgate charges. The image token price is the input price (an
  image is billed as prompt tokens); the search price is GROKGATE_SERVER_TOOL_CALL_PRICE per call. With accounts
  off nothing is charged: every price is 0.
- Context length (`max_prompt_length`): what the model's route knows (providers/base.py `DescribesModels`: the local
  engine's GROKGATE_CTX_PER_SLOT, xAI's published windows in providers/xai.py), else DEFAULT_CONTEXT_LENGTH (an
  OpenAI-compatible server does not say; 32k is what most serve at least, and a client that sizes prompts to it
  is not refused by a server with more).

Tokenize (`tokenize_text`): the tokens of a text for a model, from its route's own tokenizer (providers/base.py
`Tokenizer`: the local engine's, exact; xAI's `/v1/tokenize-text` for an xAI route), else an estimate: one token per
BYTES_PER_TOKEN bytes of UTF-8 (core/pricing.py, what grokgate bills a backend that reports no usage), each estimated
token those bytes with id 0 (there is no vocabulary). `Tokenized.exact` says which (REST: the
`x-grokgate-tokenizer` header; gRPC: trailing metadata of the same name). It requires authentication and counts as
one request against the caller's rpm, not its tpm, and costs no credits; a text is at most MAX_TEXT_CHARS characters.

Auth (`api_key_info`): the calling token's record as xAI's `ApiKey` says it, never its secret: `redacted_api_key` is
the token's display prefix (the part `grokgate keys` shows; a static or admin key shows its id, a digest, and no
character of the key); `acls` are xAI's `api-key:model:<name>` (or `:*`) and `api-key:endpoint:*`; `api_key_disabled`
a disabled token, `api_key_blocked` an expired one, `team_blocked` a balance used up. A disabled or expired token is
answered (as xAI answers a blocked key's), every other request of it is refused. `team_id` is the caller's tenant
(core/tenancy.py: the scope of everything it owns); grokgate has no users, so `user_id` and `modified_by` are
empty, and keeps no modification time, so `modify_time` is the creation time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from grokgate.api.deps import Gateway
from grokgate.core.accounts import TokenRecord, hash_token, now_ms
from grokgate.core.admission import Principal, bearer_token
from grokgate.core.billing import AccountAdmission
from grokgate.core.errors import GatewayError, bad_request
from grokgate.core.pricing import BYTES_PER_TOKEN, Price
from grokgate.core.tenancy import tenant_id, tenant_of
from grokgate.providers.base import DescribesModels, ModelFacts, Token, Tokenizer

DEFAULT_CONTEXT_LENGTH = 32_768
MAX_TEXT_CHARS = 131_072  # of a text to tokenize: about 32k tokens of English; bounds the answer (a message per token)
TICKS_PER_USD = 10**10
OWNED_BY = "grokgate"
TOKENIZER_HEADER = "x-grokgate-tokenizer"  # "exact" or "estimate"


# -- Models ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LanguageModel:
    """One public model as xAI's `LanguageModel` describes it (prices in USD ticks per token, per search)."""

    name: str
    fingerprint: str
    created: int  # Unix seconds: when this gateway started (as GET /v1/models says)
    images: bool
    prompt_text_token_price: int
    cached_prompt_text_token_price: int
    prompt_image_token_price: int
    completion_text_token_price: int
    search_price: int
    max_prompt_length: int

    @property
    def input_modalities(self) -> tuple[str, ...]:
        return ("text", "image") if self.images else ("text",)


def ticks_per_token(micro_per_million: int, credits_per_usd: float) -> int:
    """micro-credits per million tokens -> USD ticks per token (USD cents per 100M tokens), rounded up."""
    return math.ceil(Fraction(micro_per_million) / (100 * Fraction(credits_per_usd)))


def ticks_per_call(micro: int, credits_per_usd: float) -> int:
    """micro-credits per call -> USD ticks per call, rounded up."""
    return math.ceil(Fraction(micro) * (TICKS_PER_USD // 1_000_000) / Fraction(credits_per_usd))


def may_use(principal: Principal, model: str) -> bool:
    return principal.allowed_models is None or model in principal.allowed_models


def _route(gw: Gateway, principal: Principal, model: str, param: str) -> str:
    """The public name `model`, checked: 400 if empty, 404 if unknown, 403 if the token may not use it."""
    if not model:
        raise bad_request(f"'{param}' is required: the name of a model.", param)
    if gw.models.get(model) is None:
        available = ", ".join(n for n in gw.models.names() if may_use(principal, n)) or "none"
        raise GatewayError(404, "model_not_found", f"The model '{model}' does not exist. Available models: "
                           f"{available}.", param=param)
    if not may_use(principal, model):
        allowed = ", ".join(principal.allowed_models or ()) or "none"
        raise GatewayError(403, "model_not_allowed",
                           f"This token may not use the model '{model}' (allowed: {allowed}).", param=param)
    return model


async def _prices(gw: Gateway) -> dict[str, Price]:
    return await gw.store.current_prices() if gw.store is not None else {}


def _describe(gw: Gateway, name: str, price: Price | None) -> LanguageModel:
    route = gw.models.get(name)
    assert route is not None
    provider = route.provider
    facts = provider.describe(route.upstream_model) if isinstance(provider, DescribesModels) else None
    facts = facts or ModelFacts(DEFAULT_CONTEXT_LENGTH)
    cpu = gw.settings.credits_per_usd
    # No price (accounts off): nothing is charged.
    price = price or Price(name, 0, 0, 0)
    search = ticks_per_call(gw.settings.server_tool_call_price, cpu) if gw.store is not None else 0
    return LanguageModel(
        name=name, fingerprint=provider.fingerprint, created=gw.started_at, images=facts.images,
        prompt_text_token_price=ticks_per_token(price.input, cpu),
        cached_prompt_text_token_price=ticks_per_token(price.cached_input, cpu),
        prompt_image_token_price=ticks_per_token(price.input, cpu),
        completion_text_token_price=ticks_per_token(price.output, cpu), search_price=search,
        max_prompt_length=facts.context_length)


async def language_models(gw: Gateway, principal: Principal) -> list[LanguageModel]:
    """Every public model the caller may use."""
    prices = await _prices(gw)
    return [_describe(gw, name, prices.get(name)) for name in gw.models.names() if may_use(principal, name)]


async def language_model(gw: Gateway, principal: Principal, name: str, param: str = "model") -> LanguageModel:
    _route(gw, principal, name, param)
    return _describe(gw, name, (await _prices(gw)).get(name))


# -- Tokenize ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tokenized:
    model: str
    tokens: list[Token]
    exact: bool  # False: estimated (the route has no tokenizer)

    @property
    def tokenizer(self) -> str:
        return "exact" if self.exact else "estimate"


def estimated_tokens(text: str) -> list[Token]:
    """One token per BYTES_PER_TOKEN bytes of UTF-8, in order (their pieces make the text), id 0."""
    data = text.encode("utf-8")
    pieces = (data[i:i + BYTES_PER_TOKEN] for i in range(0, len(data), BYTES_PER_TOKEN))
    return [Token(0, piece, piece.decode("utf-8", "replace")) for piece in pieces]


async def count_request(gw: Gateway, principal: Principal) -> None:
    """One request against the caller's rpm and its account's (not tpm, no credits), as a refused one counts
    (core/billing.py `AccountAdmission.count_request`): 429 when either is spent, 503 when the limits cannot be
    checked and the limiter fails closed. Admin and static keys have no limits."""
    gw.gate.precheck(principal)
    if isinstance(gw.admission, AccountAdmission):
        await gw.admission.count_request(principal)


async def tokenize_text(gw: Gateway, principal: Principal, text: str, model: str) -> Tokenized:
    """`text`'s tokens for the public model `model` (see the module's docstring). The caller has counted the request
    (`count_request`), before anything of it is checked, so an invalid one counts too."""
    _route(gw, principal, model, "model")
    if len(text) > MAX_TEXT_CHARS:
        raise bad_request(f"'text' is {len(text):,} characters long; at most {MAX_TEXT_CHARS:,} are tokenized at "
                          "once.", "text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("'text' is not valid Unicode (a lone surrogate).", "text") from None
    route = gw.models.get(model)
    assert route is not None
    provider = route.provider
    tokens = await provider.tokenize(text, route.upstream_model) if isinstance(provider, Tokenizer) else None
    if tokens is None:
        return Tokenized(model, estimated_tokens(text), exact=False)
    return Tokenized(model, tokens, exact=True)


# -- Auth --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """xAI's `ApiKey` for the calling token (times in Unix milliseconds; None: grokgate has none)."""

    redacted_api_key: str
    name: str
    api_key_id: str
    team_id: str
    acls: tuple[str, ...]
    create_time: int | None = None
    modify_time: int | None = None
    user_id: str = ""
    modified_by: str = ""
    api_key_blocked: bool = False
    team_blocked: bool = False
    disabled: bool = False


def acls_of(allowed_models: tuple[str, ...] | None) -> tuple[str, ...]:
    models = ("api-key:model:*",) if allowed_models is None else tuple(f"api-key:model:{m}" for m in allowed_models)
    return (*models, "api-key:endpoint:*")


def record_info(record: TokenRecord) -> ApiKeyInfo:
    expired = record.expires_at is not None and record.expires_at <= now_ms()
    return ApiKeyInfo(
        redacted_api_key=f"{record.prefix}...", name=record.name, api_key_id=str(record.id),
        team_id=tenant_id(record.account_id, f"tok-{record.id}"), acls=acls_of(record.allowed_models),
        create_time=record.created_at, modify_time=record.created_at, api_key_blocked=expired,
        team_blocked=record.balance <= 0 or record.account_disabled, disabled=record.disabled)


async def api_key_info(gw: Gateway, authorization: str | None) -> ApiKeyInfo:
    """The info of the token in `authorization`: authenticated, except that a disabled or expired token of the
    store is answered too (its flags say so), as xAI answers for a blocked key."""
    try:
        principal = await gw.admission.authenticate(authorization)
    except GatewayError as error:
        if error.code not in ("disabled", "token_expired"):
            raise
        record = await _find(gw, authorization)
        if record is None:
            raise
        return record_info(record)
    if principal.token_id is not None and gw.store is not None:
        return record_info(await gw.store.require_token(principal.token_id))
    name = "admin token" if principal.key_id.startswith("admin-") else "static key"
    return ApiKeyInfo(redacted_api_key=principal.key_id, name=name, api_key_id=principal.key_id,
                      team_id=tenant_of(principal), acls=acls_of(principal.allowed_models))


async def _find(gw: Gateway, authorization: str | None) -> TokenRecord | None:
    """The store's record of the token (the store app.py wires is an AccountStore as well as an AdminStore)."""
    find = getattr(gw.store, "find_token", None)
    if find is None:
        return None
    record = await find(hash_token(bearer_token(authorization)))
    return record if isinstance(record, TokenRecord) else None
