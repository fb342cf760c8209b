"""Errors every layer may raise; the HTTP layer renders them in the contract's envelope."""

from __future__ import annotations

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class GatewayError(Exception):
    """A failure with a status, an AceData-style code and a message meant for the caller."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        limit: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}
        # Which limit refused the request and by how much (core/billing.py): an extra member of the error object,
        # beside AceData's code and message, which stay as they are.
        self.limit = limit

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "api_error")

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.code, "message": self.message, "type": self.type, "param": self.param}
        if self.limit is not None:
            body["limit"] = self.limit
        return body


def bad_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "bad_request", message, param=param)
