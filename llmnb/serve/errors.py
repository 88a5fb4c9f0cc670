"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so that clients report them as they would OpenAI's."""
from __future__ import annotations

from pydantic import ValidationError
from starlette.responses import JSONResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers)


def validation_error(exc: ValidationError) -> APIError:
    """A request body Pydantic refused, as OpenAI's 400: the first problem, named by the field it is in."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    where = [str(part) for part in first.get("loc", ())]
    if not where:
        return APIError(400, f"the body must be a JSON object with the request's fields: {first['msg']}")
    message = f"{'.'.join(where)}: {first['msg']}" if first.get("type") != "extra_forbidden" else \
        f"{'.'.join(where)}: unknown field (this server does not support it)"
    return APIError(400, message, param=where[0], code=first.get("type"))
