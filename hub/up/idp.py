"""Starts and stops the dev enclave's OpenID provider (hub/up/idp.mjs, npm oidc-provider) on loopback.

Node resolves an ES module's imports from the script's own folder (NODE_PATH does not apply), so
the script is copied next to the npm packages that :mod:`beamhub.hub.up.npm` installed into the
state dir and run from there; the same happens from the checkout and from an installed wheel.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from beamhub.hub.up import npm
from beamhub.hub.up.deployment import UserSpec

__all__ = ["EmbeddedIdP", "IdPError"]

SCRIPT = Path(__file__).with_name("idp.mjs")


class IdPError(RuntimeError):
    """The identity provider could not start; the message says why and what to do."""


class EmbeddedIdP:
    """A subprocess running hub/up/idp.mjs; ``issuer`` is its URL once :meth:`start` returns.

    ``state_dir`` holds the npm packages (installed on first use), the config and the log.
    """

    def __init__(
        self,
        users: Iterable[UserSpec],
        client_id: str,
        client_secret: str,
        redirect_uris: list[str],
        state_dir: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: str | os.PathLike | None = None,
        *,
        post_logout_redirect_uris: list[str] | None = None,
        require_otp: bool = False,
        totp_secrets: dict[str, str] | None = None,
    ) -> None:
        self.users = list(users)
        #: where the IdP may send the browser after the hub's logout ended its session
        self.post_logout_redirect_uris = list(post_logout_redirect_uris or [])
        #: ask enrolled users for a one-time code after the password (the enclave requires MFA)
        self.require_otp = require_otp
        #: username -> TOTP secret of the users enrolled in a second factor (hub/up/totp.py)
        self.totp_secrets = dict(totp_secrets or {})
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uris = redirect_uris
        self.state_dir = Path(state_dir)
        self.host = host
        self.port = port
        self.log_path = Path(log_path) if log_path else self.state_dir / "idp.log"
        self.issuer = ""
        self.proc: subprocess.Popen | None = None

    def _write_config(self) -> Path:
        cfg: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "redirect_uris": self.redirect_uris,
            "post_logout_redirect_uris": self.post_logout_redirect_uris,
            "require_otp": self.require_otp,
            "users": [
                {
                    "username": u.username,
                    "password": u.password,
                    "email": u.email,
                    "projects": u.projects,
                    **(
                        {"totp_secret": self.totp_secrets[u.username]}
                        if u.username in self.totp_secrets
                        else {}
                    ),
                }
                for u in self.users
            ],
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "idp-config.json"
        # holds dev passwords and TOTP secrets
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f)
        return path

    def command(self) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment to run the provider under a supervisor (port fixed).

        Installs the npm packages and the script first; the issuer is known in advance
        (``http://HOST:PORT``), so a restarted provider keeps the URLs the hub was given.
        """
        if not self.port:
            raise IdPError("a supervised identity provider needs a fixed port")
        try:
            node = npm.find_node()
            script = self._install_script(npm.ensure_installed(self.state_dir))
        except npm.NpmError as exc:
            raise IdPError(str(exc)) from exc
        config = self._write_config()
        self.issuer = f"http://{self.host}:{self.port}"
        return [node, str(script), str(config)], {"NODE_ENV": "development"}

    def answers(self) -> bool:
        """True once discovery answers with our issuer (a readiness check; blocking)."""
        try:
            with urllib.request.urlopen(self.discovery_url, timeout=2) as resp:  # noqa: S310
                return json.load(resp).get("issuer") == self.issuer
        except (OSError, ValueError):
            return False

    def start(self, timeout: float = 30.0) -> str:
        """Run the provider as a child of this process; return its issuer URL once discovery
        answers. (`beamhub up` supervises :meth:`command` instead.)"""
        if not self.port:
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
        argv, env = self.command()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **env},
            )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None:
                raise IdPError(
                    f"the identity provider exited ({self.proc.returncode}); see {self.log_path}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise IdPError(
                    f"the identity provider did not answer within {timeout:.0f}s; see "
                    f"{self.log_path}"
                )
            time.sleep(0.05)
        return self.issuer

    @staticmethod
    def _install_script(node_modules: Path) -> Path:
        """hub/up/idp.mjs copied beside ``node_modules`` (atomically: a running IdP may read it)."""
        target = node_modules.parent / SCRIPT.name
        fd, tmp = tempfile.mkstemp(prefix=".idp-", suffix=".mjs", dir=node_modules.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(SCRIPT.read_bytes())
        os.chmod(tmp, 0o644)  # code, no secret: the IdP's own account reads it
        os.replace(tmp, target)
        return target

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def endpoints(self) -> dict[str, str]:
        """authorize/token/userinfo URLs from discovery, and the hub's logout URL (which ends
        the IdP session and comes back to the first post-logout URI)."""
        with urllib.request.urlopen(self.discovery_url, timeout=5) as resp:  # noqa: S310
            doc = json.load(resp)
        out = {
            "authorize_url": doc["authorization_endpoint"],
            "token_url": doc["token_endpoint"],
            "userdata_url": doc["userinfo_endpoint"],
        }
        if self.post_logout_redirect_uris and doc.get("end_session_endpoint"):
            back = urllib.parse.quote(self.post_logout_redirect_uris[0], safe="")
            out["logout_url"] = (
                f"{doc['end_session_endpoint']}?client_id={self.client_id}"
                f"&post_logout_redirect_uri={back}"
            )
        return out

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the provider's process group; SIGKILL if it lingers."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        if proc.stdout is not None:
            proc.stdout.close()
