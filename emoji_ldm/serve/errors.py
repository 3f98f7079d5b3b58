"""The one error a route raises for its caller: a status, a message that names the bad value, and the field.

serve/http.py turns it into the JSON body every error has: `{"error": message, "field": name or null}`.
"""

from __future__ import annotations


class ApiError(Exception):
    """`extra`: figures beside the message in the JSON body (a quota's cost and what is left)."""

    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers, self.extra = status, message, field, headers, extra
