"""The UI's user-facing error: a message for the page (HTTP 4xx), never a traceback."""

from __future__ import annotations

from ..errors import PeftkitError


class UiError(PeftkitError):
    """A request the UI refuses (bad name, path outside the allowed folders, wrong state); `status` is its HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
