"""API errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with their HTTP status."""

from __future__ import annotations

from pydantic import ValidationError

from gemma2.server.responses import ErrorInfo, ErrorResponse


class APIError(Exception):
    """An answer other than 200: the status, OpenAI's error type, the request field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump(mode="json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="unavailable_error", headers={"Retry-After": "1"})


def from_validation(error: ValidationError) -> APIError:
    """A 400 naming the first field pydantic refused (e.g. `messages.0.role: Field required`)."""
    first = error.errors(include_url=False)[0]
    location = ".".join(str(part) for part in first["loc"] if part not in ("body",))
    if first["type"] == "json_invalid":
        return bad_request(f"the body is not valid JSON: {first['msg']}")
    message = first["msg"]
    if first["type"] == "model_type" or not location:
        return bad_request(f"the body must be a JSON object of the API's fields: {message}", param=location or None)
    return bad_request(f"{location}: {message}", param=location.split(".")[0])
