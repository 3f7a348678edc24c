"""TokenRefresher: keeps a server's delegated project token fresh through the hub's token service.

Inside a spawned server (notebook, kernel, Dask worker started from it) the environment holds
BEAMHUB_TOKEN, BEAMHUB_TOKEN_URL and JUPYTERHUB_API_TOKEN; ``TokenRefresher.from_env()`` trades the
token for a fresh one before it expires, authenticated by the server's own hub API token. The
upstream (identity provider) refresh token never leaves the hub.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import jwt

__all__ = ["RefreshError", "TokenRefresher"]

log = logging.getLogger("beamhub.tokens.client")


class RefreshError(RuntimeError):
    """The token service refused or could not be reached; ``status`` is its HTTP status (0: none)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _exp(token: str) -> int:
    # Reading our own token's expiry; the DSN and gateway verify the signature, we only schedule.
    return int(jwt.decode(token, options={"verify_signature": False})["exp"])


class TokenRefresher:
    """Holds the current token; :meth:`start` refreshes it on a thread when ``margin`` of it is left.

    ``margin`` is the fraction of the lifetime remaining at which to refresh (0.25: at 75 %).
    ``on_refresh(token)`` is called with each new token (e.g. to hand it to a DSN client); the new
    token is also put in ``os.environ['BEAMHUB_TOKEN']`` when ``update_env`` is true.
    """

    def __init__(
        self,
        token: str,
        service_url: str,
        api_token: str,
        *,
        margin: float = 0.25,
        on_refresh: Callable[[str], None] | None = None,
        update_env: bool = True,
        timeout: float = 10.0,
    ) -> None:
        if not 0 < margin < 1:
            raise ValueError(
                "margin is the fraction of the lifetime left at refresh: 0 < margin < 1"
            )
        self._token = token
        self.service_url = service_url if service_url.endswith("/") else service_url + "/"
        self._api_token = api_token
        self.margin = margin
        self.on_refresh = on_refresh
        self.update_env = update_env
        self.timeout = timeout
        self.refreshes = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._issued_at = time.time()

    @classmethod
    def from_env(cls, **kwargs: object) -> TokenRefresher:
        """From BEAMHUB_TOKEN, BEAMHUB_TOKEN_URL and JUPYTERHUB_API_TOKEN (a spawned server's env)."""
        missing = [
            k
            for k in ("BEAMHUB_TOKEN", "BEAMHUB_TOKEN_URL", "JUPYTERHUB_API_TOKEN")
            if not os.environ.get(k)
        ]
        if missing:
            raise RefreshError(0, f"not in a beamhub server: {', '.join(missing)} unset")
        return cls(
            os.environ["BEAMHUB_TOKEN"],
            os.environ["BEAMHUB_TOKEN_URL"],
            os.environ["JUPYTERHUB_API_TOKEN"],
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def token(self) -> str:
        with self._lock:
            return self._token

    @property
    def expires_at(self) -> int:
        return _exp(self.token)

    def refresh_now(self) -> str:
        """Trade the current token for a fresh one; raise :class:`RefreshError` if refused."""
        body = json.dumps({"token": self.token}).encode()
        req = urllib.request.Request(  # noqa: S310 - the hub's URL from the server's environment
            self.service_url + "api/refresh",
            data=body,
            method="POST",
            headers={
                "Authorization": f"token {self._api_token}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                answer = json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                message = json.load(exc).get("message", exc.reason)
            except ValueError:
                message = exc.reason
            raise RefreshError(exc.code, f"token refresh refused ({exc.code}): {message}") from exc
        except OSError as exc:
            raise RefreshError(0, f"token service unreachable: {exc}") from exc
        token = answer["token"]
        with self._lock:
            self._token = token
            self._issued_at = time.time()
        self.refreshes += 1
        if self.update_env:
            os.environ["BEAMHUB_TOKEN"] = token
        log.info("project token refreshed: jti=%s exp=%s", answer.get("jti"), answer.get("exp"))
        if self.on_refresh is not None:
            self.on_refresh(token)
        return token

    def seconds_until_refresh(self) -> float:
        with self._lock:
            issued = self._issued_at
            token = self._token
        exp = _exp(token)
        lifetime = max(1.0, exp - min(issued, exp - 1))
        return max(0.0, exp - self.margin * lifetime - time.time())

    def start(self) -> TokenRefresher:
        """Refresh on a daemon thread until :meth:`stop`; failures are retried and logged."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="token-refresh", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.seconds_until_refresh()):
            try:
                self.refresh_now()
                self.last_error = None
            except RefreshError as exc:
                self.last_error = str(exc)
                log.warning("%s", exc)
                if exc.status in (401, 403):
                    return  # revoked or role removed: retrying cannot help
                self._stop.wait(min(5.0, max(0.5, _exp(self.token) - time.time()) / 4))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 1)
            self._thread = None

    def __enter__(self) -> TokenRefresher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
