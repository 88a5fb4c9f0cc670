"""Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so that clients report them as they would OpenAI's."""
from __future__ import annotations

import re

import msgspec
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


def validation_error(exc: msgspec.DecodeError) -> APIError:
    """A request body the schema refused (`schemas.decode`), as OpenAI's 400: the problem, named by the field it is in.

    msgspec says where in its message: "Expected `int`, got `str` - at `$.max_tokens`", "Object contains unknown
    field `x`" (at the top level; deeper: "... - at `$.messages[0]`"). A body that is not JSON at all raises the
    DecodeError that ValidationError derives from."""
    if not isinstance(exc, msgspec.ValidationError):
        return APIError(400, f"the body is not valid JSON: {exc}")
    message, _, where = str(exc).partition(" - at `$")
    where = where.rstrip("`").lstrip(".")  # "messages[0].role", or "" for the body itself
    code = None
    if field := re.fullmatch(r"Object (contains unknown|missing required) field `(.+)`", message):  # the field, by name
        where = f"{where}.{field[2]}".lstrip(".")
        message, code = ("unknown field (this server does not support it)", "unknown_parameter") if field[1] == "contains unknown" \
            else ("required, and missing", None)
    elif not where and (named := re.match(r"(\w+): (.+)", message)):  # a schema's own check names its field first
        where, message = named[1], named[2]
    elif not where:
        return APIError(400, f"the body must be a JSON object with the request's fields: {message}")
    return APIError(400, f"{where}: {message}", param=re.split(r"[.\[]", where)[0], code=code)
