"""What stands in front of every route: the API key and the body size limit."""
from __future__ import annotations

import secrets

from .errors import APIError, error_response

PUBLIC_PATHS = ("/health", "/", "/favicon.ico")  # the page holds no data; it asks for the key and sends it with each call


class Guard:
    """ASGI middleware in front of every route: the API key (compared in constant time), then the body size limit.

    A body without Content-Length (chunked) is read here up to the limit and handed on whole.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] not in PUBLIC_PATHS:
            given = headers.get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return await error_response(APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                                      code="invalid_api_key"))(scope, receive, send)
        too_large = APIError(413, f"the request body is over the limit of {self.max_body_bytes} bytes", code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_body_bytes:
                return await error_response(too_large)(scope, receive, send)
            return await self.app(scope, receive, send)
        body, more = b"", scope["method"] in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await error_response(too_large)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)
