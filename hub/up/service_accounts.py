"""Each service of `beamhub up` under a system account of its own, its secrets in its own folder.

As root, `beamhub up` runs the identity provider, the DSN, the proxy, the token service, the
dashboard, the detector feed and Prometheus (``monitoring:``) each as ``beamhub-<service>`` (a system account: no login shell,
no password), all members of the group ``beamhub``, which alone may enter the state dir
(``0710 root:beamhub``: users cannot even traverse it, SLURM jobs included). Each service owns
``$STATE/<service>/`` (0700, its HOME): the token service's folder holds the signing key and the
token register, so no other service and no user process can read them; the DSN's holds its
channels and relay key. JupyterHub and the gateway stay root, because they start processes as
each user's account (the hub's spawner, the gateway's jobs) — what JupyterHub's own
LocalProcessSpawner needs too. Their secrets (``hub/``, ``crypt-key``, the audit log, the
runtime file with API tokens) are root's, 0600/0700.

Without root (the dev enclave only) every service runs as the invoking account; the folders are
the same, so nothing moves when a deployment graduates.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from beamhub.auth.home import token_dir

__all__ = [
    "GROUP",
    "SERVICES",
    "ServiceAccountError",
    "ServiceAccounts",
    "ServiceUser",
]

#: Services that run as an account of their own (the hub and the gateway stay root).
SERVICES = ("idp", "dsn", "proxy", "tokens", "dashboard", "detector", "prometheus")
#: The group whose members may enter the state dir.
GROUP = "beamhub"
#: Files of the token service that lived at the top of the state dir before it had a folder.
_TOKEN_FILES = ("signing-key.pem", "tokens.sqlite", "tokens.sqlite-wal", "tokens.sqlite-shm")


class ServiceAccountError(RuntimeError):
    """An account or a folder cannot be set up; the message says what to do."""


@dataclass(frozen=True)
class ServiceUser:
    """The Unix identity one service runs as (passed to ``subprocess.Popen``)."""

    name: str
    uid: int
    gid: int
    group_gid: int  # the beamhub group: lets it enter the state dir


def account_name(service: str) -> str:
    return f"beamhub-{service}"


class ServiceAccounts:
    """Create the accounts (root), lay out the state dir, and say who runs each service.

    ``enabled`` False (not root): :meth:`user` is None for every service and nothing changes
    owner, but the folders are the same.
    """

    def __init__(
        self,
        state: Path,
        enabled: bool,
        say: Callable[[str], None] = print,
        services: tuple[str, ...] = SERVICES,
    ) -> None:
        if enabled and os.geteuid() != 0:
            raise ServiceAccountError("service accounts need root: run `beamhub up` as root")
        self.state = Path(state)
        self.enabled = enabled
        #: the services this deployment runs (no account is made for one it does not)
        self.services = services
        self.say = say
        self._users: dict[str, ServiceUser] = {}

    # --- accounts -------------------------------------------------------------------------

    def ensure(self) -> list[str]:
        """The group and the accounts, created where missing; the names created."""
        if not self.enabled:
            return []
        created: list[str] = []
        try:
            gid = grp.getgrnam(GROUP).gr_gid
        except KeyError:
            self._run(["groupadd", "--system", GROUP])
            gid = grp.getgrnam(GROUP).gr_gid
            created.append(f"group {GROUP}")
        for service in self.services:
            name = account_name(service)
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                self._run(
                    [
                        "useradd",
                        "--system",
                        "--user-group",
                        "--no-create-home",
                        "--home-dir",
                        "/nonexistent",
                        "--shell",
                        "/usr/sbin/nologin",
                        "--groups",
                        GROUP,
                        "--comment",
                        f"beamhub {service} service",
                        name,
                    ]
                )
                entry = pwd.getpwnam(name)
                created.append(name)
            if entry.pw_uid == 0:
                raise ServiceAccountError(f"{name} is root; a service account must not be")
            self._users[service] = ServiceUser(name, entry.pw_uid, entry.pw_gid, gid)
        return created

    @staticmethod
    def _run(argv: list[str]) -> None:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except FileNotFoundError as exc:
            raise ServiceAccountError(
                f"{argv[0]} is not installed (Debian package passwd); cannot create the "
                "service accounts"
            ) from exc
        if proc.returncode not in (0, 9):  # 9: it exists (made by another process meanwhile)
            raise ServiceAccountError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")

    def user(self, service: str) -> ServiceUser | None:
        """Who runs ``service`` (None: the invoking account, i.e. root or the dev user)."""
        return self._users.get(service)

    # --- the state dir --------------------------------------------------------------------

    def folder(self, service: str) -> Path:
        """``$STATE/<service>``: the service's own folder and HOME."""
        return self.state / service

    def prepare(self) -> None:
        """Lay out the state dir: who may enter it, each service's folder and owner.

        Run on every start (cheap), so a state dir from an earlier version or a run without
        root is brought to the same layout; the token service's files move into its folder.
        """
        state = self.state
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._move_token_files()
        for private in ("hub", "logs"):
            (state / private).mkdir(mode=0o700, exist_ok=True)
            os.chmod(state / private, 0o700)
        for service in self.services:
            self.folder(service).mkdir(mode=0o700, exist_ok=True)
        if (state / "node").is_dir():  # npm packages of an earlier version were root's only
            os.chmod(state / "node", 0o755)  # noqa: S103 - code, no secrets
        if not self.enabled:
            os.chmod(state, 0o700)
            return
        gid = grp.getgrnam(GROUP).gr_gid
        os.chown(state, 0, gid)
        os.chmod(state, 0o710)  # noqa: S103 - the group may pass, not list; others nothing
        for service in self.services:
            self._own(self.folder(service), self._users[service])

    def give(self, service: str, path: Path) -> None:
        """Make file ``path`` (e.g. a config with secrets) readable by ``service`` alone."""
        user = self._users.get(service)
        os.chmod(path, 0o600)
        if user is not None:
            os.chown(path, user.uid, user.gid)

    def _move_token_files(self) -> None:
        target = token_dir(self.state)
        target.mkdir(mode=0o700, exist_ok=True)
        for name in _TOKEN_FILES:
            old = self.state / name
            if old.exists() and not (target / name).exists():
                shutil.move(str(old), target / name)
                self.say(f"beamhub up: moved {old} into {target}/ (the token service's folder)")

    def unreachable(self) -> str | None:
        """Why the service accounts could not run here, or None: they must pass (o+x) through
        every folder above the state dir and above the Python environment and code."""
        from beamhub.kernels.sandbox import code_paths

        places = [("the state dir", str(self.state))] + [
            ("beamhub's code", p) for p in code_paths()
        ]
        for what, place in places:
            for parent in Path(place).resolve().parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    return (
                        f"{what} {place} lies inside {parent}, which the service accounts "
                        f"(beamhub-*) cannot enter (mode {mode & 0o777:o}); put it where they can "
                        "(state_dir: /var/lib/beamhub in beamhub.yaml; the checkout or venv "
                        f"under /opt or /srv), or open {parent} for passage (chmod o+x)"
                    )
        return None

    def disable(self) -> None:
        """Run every service as the invoking account after all (dev enclave only)."""
        self.enabled = False
        self._users.clear()

    @staticmethod
    def _own(folder: Path, user: ServiceUser) -> None:
        """``folder`` and everything in it the service's own (0700 folder)."""
        for root, dirs, files in os.walk(folder):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), user.uid, user.gid, follow_symlinks=False)
        os.chown(folder, user.uid, user.gid)
        os.chmod(folder, 0o700)
