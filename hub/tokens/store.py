"""The hub's record of issued project tokens, revocations and users' project roles (SQLite).

The authenticator (inside the hub process) records each user's project roles at login; the token
service records its service subjects' roles at start and is the only process that issues tokens
(:class:`Delegator` holds the signing key). Token values are never stored: only their jti and
claims.

A server's delegated tokens form a *family*: the token the hub minted at spawn is its root, each
refresh adds a child and supersedes its parent (``superseded_by``), so a token is refreshed at most
once. Reusing a superseded or revoked token revokes the whole family (:meth:`TokenStore.
revoke_family`) and leaves a row in ``token_events``. The same database keeps the signed
checkpoints of the gateway's audit chain (``audit_checkpoints``), outside the log they anchor.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beamhub.auth.roles import ADMIN_MAX_TTL, ADMIN_SCOPE, FACILITY_SCOPES, ROLE_SCOPES, ROLES
from beamhub.auth.tokens import TokenIssuer

__all__ = [
    "ANY_PROJECT",
    "PENDING",
    "Delegator",
    "IssuedToken",
    "MintRefused",
    "TokenStore",
    "best_project",
    "scopes_for",
]

#: In a service subject's roles, the role it holds in every project some user has a role in.
ANY_PROJECT = "*"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    jti TEXT PRIMARY KEY, sub TEXT NOT NULL, project TEXT NOT NULL, scope TEXT NOT NULL,
    kind TEXT NOT NULL, server TEXT NOT NULL DEFAULT '', description TEXT NOT NULL DEFAULT '',
    iat INTEGER NOT NULL, exp INTEGER NOT NULL, parent TEXT NOT NULL DEFAULT '',
    revoked_at REAL, revoked_by TEXT
);
CREATE INDEX IF NOT EXISTS tokens_sub ON tokens (sub);
CREATE TABLE IF NOT EXISTS token_events (
    at REAL NOT NULL, event TEXT NOT NULL, jti TEXT NOT NULL, family TEXT NOT NULL,
    by TEXT NOT NULL, detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    log TEXT NOT NULL, count INTEGER NOT NULL, hash TEXT NOT NULL, at REAL NOT NULL,
    by TEXT NOT NULL, signature TEXT NOT NULL, PRIMARY KEY (log, count)
);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, projects TEXT NOT NULL, admin INTEGER NOT NULL DEFAULT 0,
    mfa INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL
);
"""
#: Columns added after the first release: (name, definition), added to an older database on open.
_ADDED_COLUMNS = (
    ("family", "TEXT NOT NULL DEFAULT ''"),
    ("superseded_by", "TEXT"),
)
#: ``superseded_by`` while a refresh of the token is being signed (one refresh wins a race).
PENDING = "pending"


def scopes_for(role: str) -> tuple[str, ...]:
    """The token scopes a project role may hold."""
    return ROLE_SCOPES.get(role, ())


@dataclass(frozen=True)
class IssuedToken:
    """A row of the register: what was issued to whom, never the token itself."""

    jti: str
    sub: str
    project: str
    scope: str
    kind: str
    server: str
    description: str
    iat: int
    exp: int
    parent: str
    revoked_at: float | None
    revoked_by: str | None
    family: str = ""
    superseded_by: str | None = None

    @property
    def family_id(self) -> str:
        """The jti of the family's root (the token the hub minted at spawn)."""
        return self.family or self.jti

    def to_json(self) -> dict[str, Any]:
        return {
            "jti": self.jti,
            "sub": self.sub,
            "project": self.project,
            "scope": self.scope,
            "kind": self.kind,
            "server": self.server,
            "description": self.description,
            "iat": self.iat,
            "exp": self.exp,
            "revoked": self.revoked_at is not None,
        }


class TokenStore:
    """A small SQLite register; one connection per call so threads and processes may share it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            have = {r["name"] for r in db.execute("PRAGMA table_info(tokens)")}
            for name, definition in _ADDED_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE tokens ADD COLUMN {name} {definition}")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10)
        db.row_factory = sqlite3.Row
        try:
            with db:
                yield db
        finally:
            db.close()

    def record_user(self, name: str, projects: dict[str, str], admin: bool, mfa: bool) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO users (name, projects, admin, mfa, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET projects=excluded.projects,"
                " admin=excluded.admin, mfa=excluded.mfa, updated_at=excluded.updated_at",
                (name, json.dumps(projects), int(admin), int(mfa), time.time()),
            )

    def user_projects(self, name: str) -> dict[str, str]:
        """project -> role as of the user's last login or refresh ({} if unknown)."""
        with self._db() as db:
            row = db.execute("SELECT projects FROM users WHERE name = ?", (name,)).fetchone()
        return json.loads(row["projects"]) if row else {}

    def known_user(self, name: str) -> bool:
        """True once ``name`` logged in (or was recorded as a service subject)."""
        with self._db() as db:
            row = db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone()
        return row is not None

    def known_projects(self) -> set[str]:
        """Every project in which some recorded user or subject holds a role."""
        with self._db() as db:
            rows = db.execute("SELECT projects FROM users").fetchall()
        return {p for r in rows for p in json.loads(r["projects"]) if p != ANY_PROJECT}

    def is_admin(self, name: str) -> bool:
        with self._db() as db:
            row = db.execute("SELECT admin FROM users WHERE name = ?", (name,)).fetchone()
        return bool(row and row["admin"])

    def add(
        self,
        claims: dict[str, Any],
        kind: str,
        server: str = "",
        description: str = "",
        parent: str = "",
        family: str = "",
    ) -> None:
        """Record an issued token; ``family`` is its root's jti ('' = it is a root)."""
        with self._db() as db:
            db.execute(
                "INSERT INTO tokens (jti, sub, project, scope, kind, server, description, iat, exp,"
                " parent, family) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    claims["jti"],
                    claims["sub"],
                    claims["project"],
                    claims["scope"],
                    kind,
                    server,
                    description,
                    claims["iat"],
                    claims["exp"],
                    parent,
                    family or claims["jti"],
                ),
            )
            if parent:
                db.execute(
                    "UPDATE tokens SET superseded_by = ? WHERE jti = ?", (claims["jti"], parent)
                )

    def get(self, jti: str) -> IssuedToken | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM tokens WHERE jti = ?", (jti,)).fetchone()
        return IssuedToken(**dict(row)) if row else None

    def list_for(self, sub: str, include_expired: bool = False) -> list[IssuedToken]:
        now = int(time.time())
        with self._db() as db:
            rows = db.execute(
                "SELECT * FROM tokens WHERE sub = ? AND (? OR exp > ?) ORDER BY iat DESC",
                (sub, int(include_expired), now),
            ).fetchall()
        return [IssuedToken(**dict(r)) for r in rows]

    def revoke(self, jti: str, by: str) -> bool:
        """Mark ``jti`` revoked; False if it was already revoked."""
        with self._db() as db:
            cur = db.execute(
                "UPDATE tokens SET revoked_at = ?, revoked_by = ? WHERE jti = ? AND revoked_at IS NULL",
                (time.time(), by, jti),
            )
        return cur.rowcount == 1

    def claim_refresh(self, jti: str) -> bool:
        """Mark ``jti`` as being refreshed; False if it was refreshed (or revoked) already.

        One statement, so of two refreshes of one token racing each other exactly one wins; the
        winner's child replaces the mark (:meth:`add` with ``parent``), or :meth:`release_refresh`
        undoes it when no child could be issued."""
        with self._db() as db:
            cur = db.execute(
                "UPDATE tokens SET superseded_by = ? WHERE jti = ? AND superseded_by IS NULL"
                " AND revoked_at IS NULL",
                (PENDING, jti),
            )
        return cur.rowcount == 1

    def release_refresh(self, jti: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE tokens SET superseded_by = NULL WHERE jti = ? AND superseded_by = ?",
                (jti, PENDING),
            )

    def revoke_family(self, family: str, by: str, event: str, jti: str, detail: str) -> list[str]:
        """Revoke every token of ``family`` not yet revoked; record ``event`` (e.g. ``reuse``)
        about ``jti``; return the jtis revoked now."""
        now = time.time()
        with self._db() as db:
            rows = db.execute(
                "SELECT jti FROM tokens WHERE (family = ? OR jti = ?) AND revoked_at IS NULL",
                (family, family),
            ).fetchall()
            jtis = [r["jti"] for r in rows]
            db.executemany(
                "UPDATE tokens SET revoked_at = ?, revoked_by = ? WHERE jti = ?",
                [(now, by, j) for j in jtis],
            )
            db.execute(
                "INSERT INTO token_events (at, event, jti, family, by, detail)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (now, event, jti, family, by, detail),
            )
        return jtis

    def events(self, family: str | None = None) -> list[dict[str, Any]]:
        """The recorded token events (family revocations), oldest first."""
        with self._db() as db:
            rows = db.execute(
                "SELECT * FROM token_events WHERE ? IS NULL OR family = ? ORDER BY at",
                (family, family),
            ).fetchall()
        return [dict(r) for r in rows]

    # -- audit checkpoints ---------------------------------------------------------------------
    def add_checkpoint(
        self, log: str, count: int, digest: str, at: float, by: str, signature: str
    ) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO audit_checkpoints (log, count, hash, at, by, signature)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (log, count, digest, at, by, signature),
            )

    def checkpoints(self, log: str) -> list[dict[str, Any]]:
        """The signed checkpoints of audit log ``log``, by record count."""
        with self._db() as db:
            rows = db.execute(
                "SELECT log, count, hash, at, signature FROM audit_checkpoints WHERE log = ?"
                " ORDER BY count",
                (log,),
            ).fetchall()
        return [dict(r) for r in rows]

    def revoked_jtis(self, grace: int = 60) -> list[str]:
        """Revoked jtis that are not yet past expiry (+ verifiers' leeway)."""
        with self._db() as db:
            rows = db.execute(
                "SELECT jti FROM tokens WHERE revoked_at IS NOT NULL AND exp + ? > ? ORDER BY jti",
                (grace, int(time.time())),
            ).fetchall()
        return [r["jti"] for r in rows]


class MintRefused(ValueError):
    """A token the rules do not allow; ``reason`` a code, ``field`` the request field at fault."""

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field


class Delegator:
    """Issues project tokens within the subject's role and the enclave's TTL cap, and records them."""

    def __init__(self, issuer: TokenIssuer, store: TokenStore, default_ttl: int) -> None:
        self.issuer = issuer
        self.store = store
        self.default_ttl = min(default_ttl, issuer.max_ttl)

    def allowed_scopes(self, user: str, project: str) -> tuple[str, ...]:
        projects = self.store.user_projects(user)
        role = projects.get(project)
        if role is None and ANY_PROJECT in projects and project in self.store.known_projects():
            role = projects[ANY_PROJECT]
        return scopes_for(role) if role else ()

    def issue(
        self,
        user: str,
        project: str,
        scopes: Iterable[str] | None = None,
        ttl: int | None = None,
        kind: str = "server",
        server: str = "",
        description: str = "",
        parent: str = "",
        family: str = "",
        admin: bool = False,
    ) -> tuple[str, dict[str, Any]]:
        """A signed token and its claims; :class:`MintRefused` (a message for people) if not allowed.

        ``admin``: the caller is a hub admin minting for herself (kind ``user``): she may then ask
        for the facility scopes (:data:`~beamhub.auth.roles.FACILITY_SCOPES`) by name; a token
        with ``admin`` lives at most :data:`~beamhub.auth.roles.ADMIN_MAX_TTL` seconds. Scopes
        left out mean the role's scopes, never a facility scope."""
        import jwt

        allowed = self.allowed_scopes(user, project)
        asked = set(scopes) if scopes is not None else set(allowed)
        facility = sorted(asked & FACILITY_SCOPES)
        if facility:
            self._check_facility(user, facility, kind, admin)
        elif not allowed:
            raise MintRefused(
                "no_role", f"user {user!r} has no role in project {project!r}", "project"
            )
        wanted = sorted(asked)
        if not wanted:
            raise MintRefused("bad_field", "scopes: name at least one scope", "scopes")
        extra = [s for s in wanted if s not in allowed and s not in FACILITY_SCOPES]
        if extra:
            raise MintRefused(
                "beyond_role",
                f"scopes {' '.join(extra)} are beyond {user}'s role in {project}; "
                f"allowed: {' '.join(allowed) or 'none'}",
                "scopes",
            )
        cap = self.issuer.max_ttl
        if ADMIN_SCOPE in asked:
            cap = min(cap, ADMIN_MAX_TTL)
        ttl = min(self.default_ttl, cap) if ttl is None else ttl
        if ttl <= 0 or ttl > cap:
            why = "a token with scope admin" if cap < self.issuer.max_ttl else "the enclave's cap"
            raise MintRefused("bad_field", f"ttl {ttl}s is outside 1..{cap}s ({why})", "ttl")
        token = self.issuer.issue(user, project, wanted, ttl=ttl)
        claims = jwt.decode(token, options={"verify_signature": False})
        self.store.add(
            claims,
            kind=kind,
            server=server,
            description=description,
            parent=parent,
            family=family,
        )
        return token, claims

    def _check_facility(self, user: str, facility: list[str], kind: str, admin: bool) -> None:
        names = " ".join(facility)
        if kind != "user":
            raise MintRefused(
                "beyond_role",
                f"scope {names} is never delegated to a {kind}: a hub admin asks for it "
                "herself (api/tokens, scopes [admin]), for at most a few minutes",
                "scopes",
            )
        if not admin:
            raise MintRefused(
                "admin_only",
                f"scope {names} is for hub admins only, and {user!r} is not one",
                "scopes",
            )


def best_project(projects: dict[str, str]) -> str | None:
    """The project in which the user holds the strongest role (ties: alphabetical)."""
    if not projects:
        return None
    rank = {r: i for i, r in enumerate(ROLES)}
    return min(projects, key=lambda p: (rank.get(projects[p], len(ROLES)), p))
