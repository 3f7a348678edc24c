"""One POST to a JupyterHub service with the caller's API token, errors read in the one shape.

The clients of the token service (the refresh client, the mint-for client) share it, so a
refusal reads the same everywhere: ``ServiceError(status, reason, message)``, status 0 when the
service cannot be reached.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

__all__ = ["ServiceError", "post_json"]


class ServiceError(RuntimeError):
    """The service refused (``status`` its HTTP status, ``reason`` its code) or was unreachable."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def post_json(url: str, api_token: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """POST ``body`` as JSON with ``Authorization: token``; the JSON answer. Blocking."""
    req = urllib.request.Request(  # noqa: S310 - service URLs are configuration
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"token {api_token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            raw = resp.read()
        answer = json.loads(raw) if raw else {}  # 204: nothing to say
    except urllib.error.HTTPError as exc:
        raw = exc.read().decode(errors="replace")
        try:
            error = json.loads(raw)
            reason, message = str(error["reason"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            reason, message = "http", raw[:300] or str(exc.reason)
        raise ServiceError(exc.code, reason, message) from None
    except (OSError, ValueError) as exc:
        raise ServiceError(0, "unreachable", f"cannot reach {url}: {exc}") from exc
    if not isinstance(answer, dict):
        raise ServiceError(0, "bad_answer", f"{url} answered no JSON object")
    return answer
