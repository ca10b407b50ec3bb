"""A request-body size limit as pure ASGI middleware: a body over the limit is a 413 JSON answer, never read whole."""

from __future__ import annotations

import json
from typing import Any

from sumie.serve.errors import error_body

__all__ = ["BodyLimit"]


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (by Content-Length, and by counting for chunked bodies)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(error_body("PayloadTooLarge", f"the request body is over this server's limit of "
                                                        f"{self.max_bytes} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(send)
                return
        seen = 0
        state = {"started": False, "refused": False}

        async def counted() -> dict[str, Any]:
            nonlocal seen
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # answer now; the app sees a client that went away
                    state["refused"] = True
                    if not state["started"]:
                        state["started"] = True
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if state["refused"]:
                return  # the 413 went out already
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, guarded_send)
