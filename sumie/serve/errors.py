"""HTTP errors of the server: every one a JSON body A1111 clients read (``error``, ``detail``, ``body``, ``errors``)."""

from __future__ import annotations

from sumie.errors import SumieError

__all__ = ["ApiError", "error_body"]


class ApiError(SumieError):
    """An HTTP error with a status, a one-line message naming the field (when one is at fault) and headers."""

    def __init__(self, status: int, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


def error_body(kind: str, message: str, field: str | None = None) -> dict[str, object]:
    """A1111's error JSON (``api_error_handler``), plus the field at fault when known."""
    body: dict[str, object] = {"error": kind, "detail": message, "body": "", "errors": message}
    if field is not None:
        body["field"] = field
    return body
