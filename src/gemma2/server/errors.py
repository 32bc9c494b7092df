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


# Fields that take one of several shapes: pydantic would name the first shape it tried.
SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of content parts",
}
TYPE_TAGS = ("list[", "dict[", "function-", "json-or-python[")
SCALAR_TAGS = ("str", "int", "float", "bool")


def from_validation(error: ValidationError) -> APIError:
    """A 400 naming the first field pydantic refused (e.g. `messages[0].role: Field required`)."""
    first = error.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return bad_request(f"the body is not valid JSON: {first['msg']}")
    parts = [p for p in first["loc"] if not (isinstance(p, str) and (p in SCALAR_TAGS or p.startswith(TYPE_TAGS)))]
    location = ""
    for part in parts:
        location += f"[{part}]" if isinstance(part, int) else (f".{part}" if location else str(part))
    if first["type"] == "model_type" and not location:
        return bad_request(f"the body must be a JSON object of the API's fields: {first['msg']}")
    field = str(parts[-1]) if parts else ""
    message = first["msg"].removeprefix("Value error, ")
    if not parts and first["type"] == "value_error":  # a check across fields: it names its field first
        return bad_request(message, param=message.split()[0])
    if field in SHAPES and len(first["loc"]) > len(parts):
        message = f"must be {SHAPES[field]}"
    param = str(parts[0]) if parts else None
    return bad_request(f"{location}: {message}" if location else message, param=param)
