"""TokenRefresher: keeps a server's delegated project token fresh through the hub's token service.

Inside a spawned server (notebook, kernel, Dask worker started from it) the environment holds
BEAMHUB_TOKEN, BEAMHUB_TOKEN_URL and JUPYTERHUB_API_TOKEN; ``TokenRefresher.from_env()`` trades the
token for a fresh one before it expires, authenticated by the server's own hub API token. The
upstream (identity provider) refresh token never leaves the hub.

The token service rotates: each token is refreshed at most once, and refreshing one a second time
revokes the server's whole token family (reuse detection). So every refresher of one server
(each kernel starts its own) shares the newest token through a token file (0600, in a 0700
folder; ``$BEAMHUB_TOKEN_FILE``, else one per server API token under ``~/.cache/beamhub``): under
a file lock, a refresher first adopts a newer token another one wrote, and refreshes only when
that one is due too. ``token`` always answers the newest token it knows.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt

from beamhub.auth.service_call import ServiceError, post_json

__all__ = ["RefreshError", "TokenRefresher", "default_token_file"]

log = logging.getLogger("beamhub.tokens.client")


class RefreshError(RuntimeError):
    """The token service refused or could not be reached; ``status`` is its HTTP status (0: none)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _exp(token: str) -> int:
    # Reading our own token's expiry; the DSN and gateway verify the signature, we only schedule.
    return int(jwt.decode(token, options={"verify_signature": False})["exp"])


def _iat(token: str) -> int:
    """When a token was issued (0 if it cannot be read): the later one is the newer."""
    try:
        return int(jwt.decode(token, options={"verify_signature": False})["iat"])
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        return 0


def default_token_file(api_token: str) -> Path:
    """``$BEAMHUB_TOKEN_FILE``, else ``~/.cache/beamhub/token-<id>.jwt`` where ``<id>`` is derived
    from the server's API token: every process of one server finds the same file."""
    if os.environ.get("BEAMHUB_TOKEN_FILE"):
        return Path(os.environ["BEAMHUB_TOKEN_FILE"])
    server = hashlib.sha256(api_token.encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "beamhub" / f"token-{server}.jwt"


class TokenRefresher:
    """Holds the current token; :meth:`start` refreshes it on a thread when ``margin`` of it is left.

    ``margin`` is the fraction of the lifetime remaining at which to refresh (0.25: at 75 %).
    ``on_refresh(token)`` is called with each new token (e.g. to hand it to a DSN client); the new
    token is also put in ``os.environ['BEAMHUB_TOKEN']`` when ``update_env`` is true.
    ``token_file``: where the refreshers of one server share the newest token (None: not shared;
    :meth:`from_env` uses :func:`default_token_file`).
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
        token_file: str | os.PathLike | None = None,
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
        self.token_file = Path(token_file) if token_file is not None else None
        self._file_seen: int | None = None  # mtime_ns of the token file when last read

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
        kwargs.setdefault("token_file", default_token_file(os.environ["JUPYTERHUB_API_TOKEN"]))
        return cls(
            os.environ["BEAMHUB_TOKEN"],
            os.environ["BEAMHUB_TOKEN_URL"],
            os.environ["JUPYTERHUB_API_TOKEN"],
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def token(self) -> str:
        """The newest token: ours, or a newer one another refresher of this server wrote."""
        self._adopt_shared()
        with self._lock:
            return self._token

    # -- the shared token file ----------------------------------------------------------------
    def _adopt_shared(self) -> bool:
        """Take the token file's token if it is newer than ours; True if we took it."""
        if self.token_file is None:
            return False
        try:
            seen = self.token_file.stat().st_mtime_ns
            if seen == self._file_seen:
                return False
            shared = self.token_file.read_text().strip()
        except OSError:
            return False
        self._file_seen = seen
        with self._lock:
            # the file holds the last token any refresher of this server got: newer, unless it is
            # ours or older than ours (a token from the environment is never newer than it)
            if not shared or shared == self._token or _iat(shared) < _iat(self._token):
                return False
            self._token = shared
            self._issued_at = time.time()
        if self.update_env:
            os.environ["BEAMHUB_TOKEN"] = shared
        if self.on_refresh is not None:
            self.on_refresh(shared)
        return True

    def _share(self, token: str) -> None:
        """Write ``token`` to the token file (0600, replaced atomically)."""
        if self.token_file is None:
            return
        tmp = self.token_file.with_name(f".{self.token_file.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
            os.replace(tmp, self.token_file)
            self._file_seen = self.token_file.stat().st_mtime_ns
        except OSError as exc:
            log.warning("cannot share the refreshed token in %s: %s", self.token_file, exc)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Hold the token file's lock (one refresh at a time across this server's processes)."""
        if self.token_file is None:
            yield
            return
        try:
            self.token_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(
                self.token_file.with_name(self.token_file.name + ".lock"),
                os.O_RDWR | os.O_CREAT,
                0o600,
            )
        except OSError as exc:
            log.warning("token file %s unusable (%s): refreshing unshared", self.token_file, exc)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @property
    def expires_at(self) -> int:
        return _exp(self.token)

    def refresh_now(self) -> str:
        """Trade the newest token for a fresh one (or adopt a fresh one another refresher of this
        server just got); raise :class:`RefreshError` if refused."""
        with self._file_lock():
            if self._adopt_shared() and self._due_in() > 0:
                return self.token
            return self._refresh_locked()

    def _refresh_locked(self) -> str:
        try:
            answer = post_json(
                self.service_url + "api/refresh",
                self._api_token,
                {"token": self.token},
                self.timeout,
            )
        except ServiceError as exc:
            if exc.status == 0:
                raise RefreshError(0, f"token service unreachable: {exc}") from exc
            raise RefreshError(
                exc.status, f"token refresh refused ({exc.status}): {exc.message}"
            ) from exc
        token = answer["token"]
        with self._lock:
            self._token = token
            self._issued_at = time.time()
        self.refreshes += 1
        self._share(token)
        if self.update_env:
            os.environ["BEAMHUB_TOKEN"] = token
        log.info("project token refreshed: jti=%s exp=%s", answer.get("jti"), answer.get("exp"))
        if self.on_refresh is not None:
            self.on_refresh(token)
        return token

    def seconds_until_refresh(self) -> float:
        self._adopt_shared()
        return self._due_in()

    def _due_in(self) -> float:
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
