"""A small HTTP reply record, and one exchange, shared by the unit tests that talk to real servers."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    """A response read to its end."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


def exchange(conn: http.client.HTTPConnection, method: str, path: str, data: bytes | None,
             headers: dict[str, str]) -> Reply:
    """One request on `conn`, its whole answer read, the connection closed."""
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()
