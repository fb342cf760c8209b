"""`xai_api.Models`, `xai_api.Tokenize` and `xai_api.Auth`: what xai-sdk's `client.models`, `client.tokenize` and
`client.auth` call. What they answer is api/xai_info.py's, shared with the REST twins (api/xai_routes.py); here it
is turned into xAI's messages (xai_sdk/proto/v6 models_pb2, tokenize_pb2, auth_pb2), and a GatewayError into its
status (rpc/errors.py).

- Models: `ListLanguageModels` / `GetLanguageModel` (prices in xAI's unit, USD cents per 100M tokens; context
  length as `max_prompt_length`); grokgate serves no embedding or image generation models, so their lists are
  empty and a get is NOT_FOUND.
- Tokenize: `TokenizeText`; trailing metadata `x-grokgate-tokenizer` says `exact` or `estimate`.
- Auth: `get_api_key_info`, the calling token's `ApiKey` without its secret.

Every RPC authenticates the `authorization` metadata (rpc/auth.py); only TokenizeText counts against the rpm. A
request that is not its method's message is INVALID_ARGUMENT (rpc/handlers.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2
from xai_sdk.proto.v6 import (
    auth_pb2,
    auth_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    tokenize_pb2,
    tokenize_pb2_grpc,
)

from grokgate.api import xai_info
from grokgate.api.deps import Gateway
from grokgate.core.errors import GatewayError
from grokgate.rpc.auth import authenticate, authorization_of, caller_check
from grokgate.rpc.errors import abort
from grokgate.rpc.handlers import add_servicer
from grokgate.rpc.server import Register

Context = grpc.aio.ServicerContext[Any, Any]
_T = TypeVar("_T")

async def answer(context: Context, work: Awaitable[_T]) -> _T:
    """`work`'s result, or the RPC ended with its GatewayError's status."""
    try:
        return await work
    except GatewayError as error:
        await abort(context, error)


def language_model(model: xai_info.LanguageModel) -> models_pb2.LanguageModel:
    modalities = [models_pb2.TEXT, models_pb2.IMAGE] if model.images else [models_pb2.TEXT]
    message = models_pb2.LanguageModel(
        name=model.name, input_modalities=modalities, output_modalities=[models_pb2.TEXT],
        prompt_text_token_price=model.prompt_text_token_price,
        prompt_image_token_price=model.prompt_image_token_price,
        cached_prompt_token_price=model.cached_prompt_text_token_price,
        completion_text_token_price=model.completion_text_token_price, search_price=model.search_price,
        max_prompt_length=min(model.max_prompt_length, 2**31 - 1), system_fingerprint=model.fingerprint)
    message.created.FromSeconds(model.created)
    return message


class Models(models_pb2_grpc.ModelsServicer):  # type: ignore[misc]
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def ListLanguageModels(self, request: empty_pb2.Empty,
                                 context: Context) -> models_pb2.ListLanguageModelsResponse:
        async def work() -> models_pb2.ListLanguageModelsResponse:
            principal = await authenticate(self.gw.admission, context)
            models = await xai_info.language_models(self.gw, principal)
            return models_pb2.ListLanguageModelsResponse(models=[language_model(m) for m in models])

        return await answer(context, work())

    async def GetLanguageModel(self, request: models_pb2.GetModelRequest, context: Context) -> models_pb2.LanguageModel:
        async def work() -> models_pb2.LanguageModel:
            principal = await authenticate(self.gw.admission, context)
            return language_model(await xai_info.language_model(self.gw, principal, request.name, param="name"))

        return await answer(context, work())

    async def ListEmbeddingModels(self, request: empty_pb2.Empty,
                                  context: Context) -> models_pb2.ListEmbeddingModelsResponse:
        await answer(context, authenticate(self.gw.admission, context))
        return models_pb2.ListEmbeddingModelsResponse()

    async def ListImageGenerationModels(self, request: empty_pb2.Empty,
                                        context: Context) -> models_pb2.ListImageGenerationModelsResponse:
        await answer(context, authenticate(self.gw.admission, context))
        return models_pb2.ListImageGenerationModelsResponse()

    async def GetEmbeddingModel(self, request: models_pb2.GetModelRequest, context: Context) -> Any:
        await self._none(context, request.name, "embedding")

    async def GetImageGenerationModel(self, request: models_pb2.GetModelRequest, context: Context) -> Any:
        await self._none(context, request.name, "image generation")

    async def _none(self, context: Context, name: str, kind: str) -> None:
        await answer(context, authenticate(self.gw.admission, context))
        await abort(context, GatewayError(404, "model_not_found", f"The {kind} model '{name}' does not exist: "
                                          f"grokgate serves no {kind} models.", param="name"))


class Tokenize(tokenize_pb2_grpc.TokenizeServicer):  # type: ignore[misc]
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def TokenizeText(self, request: tokenize_pb2.TokenizeTextRequest,
                           context: Context) -> tokenize_pb2.TokenizeTextResponse:
        async def work() -> xai_info.Tokenized:
            principal = await authenticate(self.gw.admission, context)
            await xai_info.count_request(self.gw, principal)
            return await xai_info.tokenize_text(self.gw, principal, request.text, request.model)

        tokenized = await answer(context, work())
        context.set_trailing_metadata(((xai_info.TOKENIZER_HEADER, tokenized.tokenizer),))
        tokens = [tokenize_pb2.Token(token_id=t.id, string_token=t.text, token_bytes=t.piece)
                  for t in tokenized.tokens]
        return tokenize_pb2.TokenizeTextResponse(tokens=tokens, model=tokenized.model)


class Auth(auth_pb2_grpc.AuthServicer):  # type: ignore[misc]
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def get_api_key_info(self, request: empty_pb2.Empty, context: Context) -> auth_pb2.ApiKey:
        info = await answer(context, xai_info.api_key_info(self.gw, authorization_of(context)))
        message = auth_pb2.ApiKey(
            redacted_api_key=info.redacted_api_key, user_id=info.user_id, name=info.name,
            modified_by=info.modified_by, team_id=info.team_id, acls=list(info.acls), api_key_id=info.api_key_id,
            api_key_blocked=info.api_key_blocked, team_blocked=info.team_blocked, disabled=info.disabled)
        if info.create_time is not None:
            message.create_time.FromMilliseconds(info.create_time)
        if info.modify_time is not None:
            message.modify_time.FromMilliseconds(info.modify_time)
        return message


def register(gw: Gateway) -> Register:
    def add(server: grpc.aio.Server) -> Iterable[str]:
        before = caller_check(gw.admission)  # no message is read for a caller without a valid key
        return [add_servicer(server, models_pb2_grpc.add_ModelsServicer_to_server, Models(gw), before=before),
                add_servicer(server, tokenize_pb2_grpc.add_TokenizeServicer_to_server, Tokenize(gw), before=before),
                add_servicer(server, auth_pb2_grpc.add_AuthServicer_to_server, Auth(gw),
                             before=caller_check(gw.admission, known=True))]

    return add
