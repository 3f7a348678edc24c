"""The hub's record of issued project tokens, revocations and users' project roles (SQLite).

The authenticator (inside the hub process) records each user's project roles at login; the token
service records its service subjects' roles at start and is the only process that issues tokens
(:class:`Delegator` holds the signing key). Token values are never stored: only their jti and
claims.
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

from beamhub.auth.roles import ROLE_SCOPES, ROLES
from beamhub.auth.tokens import TokenIssuer

__all__ = [
    "ANY_PROJECT",
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
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, projects TEXT NOT NULL, admin INTEGER NOT NULL DEFAULT 0,
    mfa INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL
);
"""


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
    ) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO tokens (jti, sub, project, scope, kind, server, description, iat, exp,"
                " parent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                ),
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
    ) -> tuple[str, dict[str, Any]]:
        """A signed token and its claims; :class:`MintRefused` (a message for people) if not allowed."""
        import jwt

        allowed = self.allowed_scopes(user, project)
        if not allowed:
            raise MintRefused(
                "no_role", f"user {user!r} has no role in project {project!r}", "project"
            )
        wanted = sorted(set(scopes) if scopes is not None else set(allowed))
        if not wanted:
            raise MintRefused("bad_field", "scopes: name at least one scope", "scopes")
        extra = [s for s in wanted if s not in allowed]
        if extra:
            raise MintRefused(
                "beyond_role",
                f"scopes {' '.join(extra)} are beyond {user}'s role in {project}; "
                f"allowed: {' '.join(allowed)}",
                "scopes",
            )
        ttl = self.default_ttl if ttl is None else ttl
        if ttl <= 0 or ttl > self.issuer.max_ttl:
            raise MintRefused(
                "bad_field",
                f"ttl {ttl}s is outside 1..{self.issuer.max_ttl}s (the enclave's cap)",
                "ttl",
            )
        token = self.issuer.issue(user, project, wanted, ttl=ttl)
        claims = jwt.decode(token, options={"verify_signature": False})
        self.store.add(claims, kind=kind, server=server, description=description, parent=parent)
        return token, claims


def best_project(projects: dict[str, str]) -> str | None:
    """The project in which the user holds the strongest role (ties: alphabetical)."""
    if not projects:
        return None
    rank = {r: i for i, r in enumerate(ROLES)}
    return min(projects, key=lambda p: (rank.get(projects[p], len(ROLES)), p))
