"""The local backend's sandbox: bubblewrap around a job run as its account, cgroup limits per node.

A sandboxed job sees the system read-only, a private /tmp, its home (and the user-owned folders
its output and workdir live in) writable, its own PID namespace, and no beamhub state dir: a
tmpfs covers it, or covers its highest ancestor that other accounts could not traverse anyway
(``/root`` for the default ``~/.beamhub`` of root). bwrap starts as root, so ``setpriv`` then
drops to the account's uid, gid and groups, with no capabilities and ``no_new_privs`` (setuid
programs cannot raise it back).

Signals: the backend stops a job with SIGTERM to its process group, which also reaches bwrap.
bwrap would die of it at once and the backend would see the job end while it still runs its
checkpoint; so the wrapper (kernels/_jobwrap.py) starts bwrap with SIGTERM ignored, and
``env --default-signal=TERM`` gives the job its default SIGTERM back just before it starts.

Limits: each virtual node is a cgroup with the node's memory and CPUs (v1: ``memory``/``cpu``
hierarchies; v2: ``memory.max``/``cpu.max``), detected, never assumed; :attr:`NodeLimits.summary`
says what is enforced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import sys
from pathlib import Path

from beamhub.kernels.accounts import Account
from beamhub.kernels.scheduler import SchedulerError

__all__ = [
    "NodeLimits",
    "account_argv",
    "bwrap_argv",
    "code_paths",
    "hidden_roots",
    "owned_dir",
    "require_bwrap",
]

CPU_PERIOD_US = 100_000


def require_bwrap() -> str:
    """The bwrap binary, or a SchedulerError saying how to get it."""
    path = shutil.which("bwrap")
    if path is None:
        raise SchedulerError(
            "the local backend's sandbox needs bubblewrap: apt-get install bubblewrap "
            "(scripts/apt-packages.txt lists it), or set sandbox=False (not isolated)",
            status=500,
            field="sandbox",
        )
    return path


def hidden_roots(paths: list[str | Path]) -> list[str]:
    """What to cover with a tmpfs so that ``paths`` are invisible: each path, or its highest
    ancestor that is not world-traversable (its content is out of other accounts' reach
    already, and the job's binds can then be recreated beneath it)."""
    roots: list[str] = []
    for raw in paths:
        path = Path(os.path.realpath(raw))
        cover = path
        for parent in reversed(path.parents):  # from / downwards
            if parent == Path("/"):
                continue
            try:
                if not parent.stat().st_mode & stat.S_IXOTH:
                    cover = parent
                    break
            except OSError:
                break
        text = str(cover)
        if not any(text == r or text.startswith(r + "/") for r in roots):
            roots = [r for r in roots if not r.startswith(text + "/")] + [text]
    return roots


def owned_dir(path: str | Path, account: Account) -> str | None:
    """``path``'s real location if it is a folder that ``account`` owns, else None."""
    real = os.path.realpath(path)
    try:
        info = os.stat(real)
    except OSError:
        return None
    return real if stat.S_ISDIR(info.st_mode) and info.st_uid == account.uid else None


def code_paths() -> list[str]:
    """The interpreter's prefixes and the folder holding beamhub's code (the checkout's root,
    or site-packages/beamhub): what a job runs from."""
    roots = {sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[1])}
    return sorted(os.path.realpath(r) for r in roots)


def bwrap_argv(
    account: Account,
    argv: list[str],
    *,
    hide: list[str],
    writable: list[str],
    workdir: str | None = None,
    output: str | None = None,
    bwrap: str = "bwrap",
) -> list[str]:
    """The command that runs ``argv`` as ``account`` in the sandbox.

    ``writable`` folders (the home first) are bound read-write at their own paths after the
    ``hide`` tmpfs mounts; ``output`` is opened (appended to) by the job itself, as the account,
    so a path the user chose can never make root write somewhere.
    """
    cmd = [
        bwrap,
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--perms", "1777", "--tmpfs", "/tmp",  # noqa: S108 -- a private, empty tmpfs per job
        "--perms", "1777", "--tmpfs", "/dev/shm",  # noqa: S108 -- likewise
        "--unshare-pid",
        "--unshare-ipc",
        "--die-with-parent",
    ]  # fmt: skip
    for path in hide:
        cmd += ["--tmpfs", path]
    tmpfs = ["/tmp", "/dev/shm", *hide]  # noqa: S108 -- the private tmpfs mounts above
    seen: set[str] = set()
    # what every job must read even where a tmpfs covers it (a checkout or venv under /tmp):
    # the interpreter, its venv and beamhub's own code, read-only
    code = [p for p in code_paths() if any(p.startswith(t + "/") for t in tmpfs)]
    for path, how in [*((p, "--ro-bind") for p in code), *((p, "--bind") for p in writable)]:
        if path in seen:
            continue
        seen.add(path)
        # bwrap makes a bind's missing parents inside a tmpfs 0700 root: the account would be
        # shut out of its own folder; those parents are made traversable (0711, no listing)
        for parent in reversed(Path(path).parents):
            text = str(parent)
            under = any(text.startswith(t + "/") for t in tmpfs)
            if under and text not in seen:
                seen.add(text)
                cmd += ["--perms", "0711", "--dir", text]
        cmd += [how, path, path]
    cmd += ["--chdir", workdir or account.home, "--"]
    return cmd + account_argv(account, argv, output)


def account_argv(account: Account, argv: list[str], output: str | None = None) -> list[str]:
    """``argv`` run as ``account`` (from root): its uid, gid and groups, no capabilities,
    ``no_new_privs``, SIGTERM back to its default, stdout+stderr appended to ``output``."""
    cmd = [
        "setpriv",
        f"--reuid={account.uid}",
        f"--regid={account.gid}",
        "--init-groups",
        "--no-new-privs",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
        "env",
        "--default-signal=TERM",
    ]
    if output:  # sh opens the file as the account; the path is an argument, never shell text
        cmd += ["/bin/sh", "-c", 'exec >>"$0" 2>&1 || exit 126; exec "$@"', output]
    return cmd + list(argv)


def _mounts() -> dict[str, str]:
    """cgroup hierarchies: controller (or "unified") → mount point, from /proc/self/mountinfo."""
    found: dict[str, str] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, extra = left.split(), right.split()
        if len(fields) < 5 or len(extra) < 3:
            continue
        mount, fstype = fields[4], extra[0]
        if fstype == "cgroup2":
            found.setdefault("unified", mount)
        elif fstype == "cgroup":
            for opt in extra[2].split(","):
                if opt in ("memory", "cpu"):
                    found.setdefault(opt, mount)
    return found


def _own_path(controller: str) -> str:
    """This process's cgroup in ``controller``'s v1 hierarchy ("" for v2), from /proc/self/cgroup."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            if (controller and controller in names.split(",")) or (not controller and not names):
                return path.lstrip("/")
    except (OSError, ValueError):
        pass
    return ""


class NodeLimits:
    """One cgroup per virtual node (memory + CPU), where the cgroup filesystem is writable."""

    def __init__(self, tag: str, log: logging.Logger | None = None) -> None:
        self.log = log or logging.getLogger("beamhub.kernels.sandbox")
        self.name = "beamhub-" + hashlib.sha256(tag.encode()).hexdigest()[:10]
        self.version = ""
        self.bases: dict[str, Path] = {}  # controller ("memory", "cpu", "unified") → base dir
        self.enforced: list[str] = []
        self.missing: list[str] = []
        self._detect()

    def _detect(self) -> None:
        mounts = _mounts()
        unified = mounts.get("unified")
        controllers = ""
        if unified:
            with_ctrl = Path(unified) / _own_path("") / "cgroup.controllers"
            try:
                controllers = with_ctrl.read_text()
            except OSError:
                controllers = ""
        if unified and {"memory", "cpu"} & set(controllers.split()):
            self.version = "v2"
            base = Path(unified) / _own_path("") / self.name
            if self._make(base):
                try:  # children get memory and cpu only if the parent delegates them
                    (base / "cgroup.subtree_control").write_text("+memory +cpu")
                except OSError as exc:
                    self.log.info("cgroup v2: cannot delegate controllers under %s: %s", base, exc)
                self.bases["unified"] = base
                self.enforced = [c for c in ("memory", "cpu") if c in controllers.split()]
        elif "memory" in mounts or "cpu" in mounts:
            self.version = "v1"
            for controller in ("memory", "cpu"):
                if controller in mounts:
                    base = Path(mounts[controller]) / _own_path(controller) / self.name
                    if self._make(base):
                        self.bases[controller] = base
                        self.enforced.append(controller)
        self.missing = [c for c in ("memory", "cpu") if c not in self.enforced]

    def _make(self, path: Path) -> bool:
        try:
            path.mkdir(parents=True, exist_ok=True)
            return True
        except OSError as exc:
            self.log.info("cgroups: %s is not writable (%s)", path, exc.strerror)
            return False

    @property
    def summary(self) -> str:
        if not self.version:
            return "no cgroup filesystem found: node memory/CPU limits are NOT enforced"
        what = " and ".join(self.enforced) or "nothing"
        text = f"cgroups {self.version}: per-node {what} limits enforced"
        if self.missing:
            text += f"; {' and '.join(self.missing)} NOT enforced (not writable or not mounted)"
        return text

    def node(self, name: str, cpus: int, mem_mb: int) -> list[str]:
        """The ``cgroup.procs`` files a process of node ``name`` joins (made on first use)."""
        procs: list[str] = []
        for controller, base in self.bases.items():
            path = base / name
            try:
                path.mkdir(exist_ok=True)
                if controller in ("memory", "unified") and "memory" in self.enforced:
                    limit = str(mem_mb * 1024 * 1024)
                    file = "memory.max" if controller == "unified" else "memory.limit_in_bytes"
                    _write_if_changed(path / file, limit)
                if controller in ("cpu", "unified") and "cpu" in self.enforced:
                    quota = cpus * CPU_PERIOD_US
                    if controller == "unified":
                        _write_if_changed(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
                    else:
                        _write_if_changed(path / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                        _write_if_changed(path / "cpu.cfs_quota_us", str(quota))
            except OSError as exc:
                self.log.warning("cgroup %s of node %s: %s", path, name, exc)
                continue
            procs.append(str(path / "cgroup.procs"))
        return procs

    def remove(self) -> None:
        """Remove the node cgroups that no process uses any more (rmdir fails on busy ones)."""
        for base in self.bases.values():
            for child in sorted(base.glob("*/"), reverse=True):
                if child.is_dir():
                    try:
                        child.rmdir()
                    except OSError:
                        pass
            try:
                base.rmdir()
            except OSError:
                pass


def _write_if_changed(path: Path, value: str) -> None:
    try:
        if path.read_text().split() == value.split():
            return
    except OSError:
        pass
    path.write_text(value)
