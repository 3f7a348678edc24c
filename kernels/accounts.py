"""Each hub user's Unix account: the name mapping, its private home, creation on first use.

Decision 9 (tenancy): every server, job and Dask worker runs as its user's account, so a member's
code holds her own files and nothing of the hub's. The mapping is a template over the identity
provider's username (default ``bh-{username}``). As root the account is created on first use
(``useradd``, a group of its own, a 0700 home under ``home_root``, default ``/home``): homes live
outside the beamhub state dir so that the state dir stays 0700 as a whole, no user needs to
traverse it (a state dir under ``/root`` would not even allow that), and a SLURM job, which runs
without our sandbox, finds its home at the same path on every node of a site with a shared /home.

``mode="self"`` is the dev enclave without root: every user runs as the invoking account; each
still gets a home of her own (``<home_root>/<username>``) for HOME and JupyterLab's directories,
which separates files, not people.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from beamhub.kernels.scheduler import SchedulerError

__all__ = ["ACCOUNT_NAME", "MODES", "Account", "AccountMap", "copy_as", "private_dir"]

#: What useradd accepts on Debian (and what is portable): lower case, at most 32 characters.
ACCOUNT_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
#: ``account``: each user's own Unix account (needs root); ``self``: the invoking account.
MODES = ("account", "self")
#: A job's private beamhub folder inside its home (port reports, tokens, server logs).
PRIVATE = ".beamhub"


@dataclass(frozen=True)
class Account:
    """The Unix identity a hub user's processes run as."""

    user: str  # the hub (IdP) username
    name: str  # the Unix account
    uid: int
    gid: int
    home: str

    @property
    def switches(self) -> bool:
        """True when starting a process for this account changes uid (we are root, it is not)."""
        return self.uid != os.geteuid()


class AccountMap:
    """Hub username → :class:`Account`; ``ensure`` creates what is missing (root only)."""

    def __init__(
        self,
        mode: str = "self",
        template: str = "bh-{username}",
        home_root: str | os.PathLike = "",
        create: bool = True,
        log: logging.Logger | None = None,
    ) -> None:
        if mode not in MODES:
            raise SchedulerError(
                f"run_as must be one of {', '.join(MODES)}, got {mode!r}", field="run_as"
            )
        if mode == "account" and os.geteuid() != 0:
            raise SchedulerError(
                "run_as='account' runs each user's processes as her own Unix account, which "
                "needs root; start the hub as root, or use run_as='self' (dev enclave only)",
                status=500,
                field="run_as",
            )
        if "{username}" not in template:
            raise SchedulerError(
                f"account_template {template!r} must contain {{username}}",
                field="account_template",
            )
        self.mode = mode
        self.template = template
        #: in self mode without a home_root every user shares the hub's own HOME
        self.home_root_set = bool(home_root) or mode == "account"
        self.home_root = Path(home_root or ("/home" if mode == "account" else Path.home()))
        if not self.home_root.is_absolute():
            raise SchedulerError(
                f"home_root must be an absolute path, got {str(home_root)!r}", field="home_root"
            )
        self.create = create
        self.log = log or logging.getLogger("beamhub.kernels.accounts")
        self._lock = threading.Lock()

    def name_for(self, user: str) -> str:
        """The Unix account name of hub user ``user`` (refused, never mangled, if invalid)."""
        if self.mode == "self":
            return pwd.getpwuid(os.geteuid()).pw_name
        name = self.template.format(username=user)
        if not ACCOUNT_NAME.match(name):
            raise SchedulerError(
                f"user {user!r} maps to {name!r}, which is not a valid Unix account name "
                "(lower-case letters, digits, '-', '_', at most 32 characters); change "
                "account_template or the user's name at the identity provider",
                status=403,
                field="user",
            )
        return name

    def lookup(self, user: str) -> Account | None:
        """The user's account if it exists (no creation)."""
        name = self.name_for(user)
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        if self.mode == "self":
            home = str(self.home_root / user) if self.home_root_set else str(Path.home())
            if not re.fullmatch(r"[A-Za-z0-9_.@+-]+", user) or user in (".", ".."):
                raise SchedulerError(f"user name {user!r} cannot name a folder", field="user")
        else:
            home = entry.pw_dir
            if entry.pw_uid == 0:
                raise SchedulerError(
                    f"user {user!r} maps to {name!r}, which is root; refusing", status=403
                )
        return Account(user=user, name=name, uid=entry.pw_uid, gid=entry.pw_gid, home=home)

    def ensure(self, user: str) -> Account:
        """The user's account, created (with its home) on first use. Blocking: call it in a
        thread from the event loop."""
        with self._lock:
            account = self.lookup(user)
            if account is None:
                account = self._create(user)
            self._ensure_home(account)
            return account

    def _create(self, user: str) -> Account:
        name = self.name_for(user)
        if not self.create:
            raise SchedulerError(
                f"no Unix account {name!r} for user {user!r}; create it (useradd), or let "
                "beamhub create accounts on first use",
                status=403,
                field="user",
            )
        self.home_root.mkdir(parents=True, exist_ok=True, mode=0o755)
        home = self.home_root / name
        argv = [
            "useradd",
            "--create-home",
            "--home-dir",
            str(home),
            "--shell",
            "/bin/bash",
            "--user-group",
            "--no-log-init",
            "--comment",
            f"beamhub user {user}",
            "--key",
            "HOME_MODE=0700",
            name,
        ]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except FileNotFoundError as exc:
            raise SchedulerError(
                "useradd is not installed (Debian package passwd); cannot create accounts",
                status=500,
            ) from exc
        account = self.lookup(user)
        if account is None:  # 9 = exists: another process made it between lookup and here
            raise SchedulerError(
                f"could not create the Unix account {name!r}: {proc.stderr.strip()}", status=500
            )
        if proc.returncode == 0:
            self.log.info(
                "created Unix account %s (uid %s) for user %s, home %s (0700)",
                name,
                account.uid,
                user,
                account.home,
            )
        return account

    def _ensure_home(self, account: Account) -> None:
        home = Path(account.home)
        if self.mode == "self":
            if self.home_root_set:
                home.mkdir(parents=True, exist_ok=True, mode=0o700)
            return
        if not home.is_dir():
            home.mkdir(parents=True, mode=0o700)
            os.chown(home, account.uid, account.gid)
            self.log.info("created home %s for %s", home, account.name)
        info = home.lstat()
        if info.st_uid != account.uid or info.st_mode & 0o077:
            os.chown(home, account.uid, account.gid, follow_symlinks=False)
            os.chmod(home, 0o700, follow_symlinks=False)

    def describe(self) -> str:
        if self.mode == "self":
            homes = f"homes under {self.home_root}" if self.home_root_set else "one shared HOME"
            return f"every user runs as {self.name_for('-')} (not isolated), {homes}"
        return f"each user runs as her own account {self.template!r}, homes under {self.home_root}"


def private_dir(account: Account, *parts: str) -> Path:
    """A folder only ``account`` (and root) may enter, inside its home: ``~/.beamhub/<parts>``.

    Created as the account's when we are root, every level 0700; an existing symlink on the way
    is refused (a user's home is hers to rearrange, and the hub reads from here as root).
    """
    path = Path(account.home)
    for part in (PRIVATE, *parts):
        if not part or "/" in part or part in (".", ".."):
            raise SchedulerError(f"bad folder name {part!r}", field="name")
        path = path / part
        try:
            os.mkdir(path, 0o700)
            if account.switches:
                os.chown(path, account.uid, account.gid, follow_symlinks=False)
        except FileExistsError:
            info = path.lstat()
            if not path.is_dir() or path.is_symlink() or info.st_uid != account.uid:
                raise SchedulerError(
                    f"{path} is not a folder of {account.name}; remove it and try again",
                    status=409,
                ) from None
    return path


def copy_as(account: Account, source: str | os.PathLike, target: str) -> None:
    """Copy folder ``source`` into ``~/<target>`` as ``account``, never over her files.

    As her (setpriv), so that a symlink she left in her home cannot make root write elsewhere.
    """
    if not target or target.startswith("/") or ".." in Path(target).parts:
        raise SchedulerError(f"home_files: {target!r} must be a folder name inside the home")
    dest = str(Path(account.home) / target)
    script = 'mkdir -p -- "$1" && cp -R -n -- "$0"/. "$1"'
    argv = ["/bin/sh", "-c", script, str(source), dest]
    if account.switches:
        argv = [
            "setpriv",
            f"--reuid={account.uid}",
            f"--regid={account.gid}",
            "--init-groups",
            "--no-new-privs",
            "--",
            *argv,
        ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=account.home)
    if proc.returncode != 0:
        raise SchedulerError(
            f"could not copy {source} into {dest} as {account.name}: {proc.stderr.strip()}",
            status=500,
        )
