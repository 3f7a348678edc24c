"""Incidents: something is broken now (unlike maintenance, which is planned), as data.

An incident names its severity, the services it affects (from
:data:`~beamhub.kernels.maintenance.SERVICES`) and, optionally, the projects it affects (none:
everyone). Admins open, update and close it (`beamhub incident`); the gateway's public status
lists the open ones and the hub's banner shows them above maintenance. Each update is kept, so a
closed incident still tells its story. The incidents live in the reservation book's SQLite file,
beside the maintenance calendar, so the hub, the gateway and the CLI read one file.
"""

from __future__ import annotations

import html
import json
import sqlite3
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from beamhub.kernels.maintenance import SERVICES
from beamhub.kernels.scheduler import SchedulerError
from beamhub.kernels.sqlite_db import open_book, transaction

__all__ = ["SEVERITIES", "Incident", "IncidentLog", "incident_banner"]

#: From least to most severe: minor (degraded, work goes on), major (some work stops),
#: critical (the facility, or a beamtime, cannot work).
SEVERITIES = ("minor", "major", "critical")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    severity TEXT NOT NULL,
    services TEXT NOT NULL,
    projects TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'open',
    opened_by TEXT NOT NULL,
    opened_at REAL NOT NULL,
    closed_by TEXT,
    closed_at REAL,
    updates TEXT NOT NULL DEFAULT '[]'
);
"""


def _fmt(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class Incident:
    """One incident; ``updates`` is its timeline: ``{at, by, message}`` and what changed."""

    id: int
    title: str
    severity: str
    services: tuple[str, ...]
    projects: tuple[str, ...]
    status: str  # open | closed
    opened_by: str
    opened_at: float
    closed_by: str | None = None
    closed_at: float | None = None
    updates: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def affects(self, projects: Iterable[str]) -> bool:
        """Whether a member of ``projects`` is affected (an incident naming none affects all)."""
        return not self.projects or bool(set(self.projects) & set(projects))

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data.update(
            services=list(self.services),
            projects=list(self.projects),
            updates=list(self.updates),
            opened_iso=datetime.fromtimestamp(self.opened_at, UTC).isoformat(),
        )
        return data

    def public(self) -> dict[str, Any]:
        """What anyone may read (the status page): not who opened or updated it."""
        return {
            "id": self.id,
            "title": self.title,
            "severity": self.severity,
            "services": list(self.services),
            "projects": list(self.projects),
            "status": self.status,
            "opened_at": self.opened_at,
            "opened_iso": datetime.fromtimestamp(self.opened_at, UTC).isoformat(),
            "updates": [{"at": u["at"], "message": u["message"]} for u in self.updates],
        }


def _row(row: sqlite3.Row) -> Incident:
    data = dict(row)
    data["services"] = tuple(json.loads(data["services"]))
    data["projects"] = tuple(json.loads(data["projects"]))
    data["updates"] = tuple(json.loads(data["updates"]))
    return Incident(**data)


def _severity(value: Any) -> str:
    text = str(value or "").strip().lower()
    if text not in SEVERITIES:
        raise SchedulerError(
            f"severity {value!r}: use one of {', '.join(SEVERITIES)}", field="severity"
        )
    return text


def _services(value: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split(",")
    services = tuple(dict.fromkeys(str(s).strip() for s in value if str(s).strip()))
    unknown = [s for s in services if s not in SERVICES]
    if not services or unknown:
        raise SchedulerError(
            f"services: {', '.join(map(repr, unknown)) or 'nothing'}; name what is affected, "
            f"from {', '.join(SERVICES)}",
            field="services",
        )
    return services


def _projects(value: Iterable[str] | str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(dict.fromkeys(str(p).strip() for p in value if str(p).strip()))


def _who(by: str, name: str = "by") -> str:
    if not by or not str(by).strip():
        raise SchedulerError("name the admin", field=name)
    return str(by).strip()


class IncidentLog:
    """Incidents in SQLite (``db_path``: the reservation book's file)."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = open_book(db_path, _SCHEMA)

    def _db(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.db_path)

    def open(
        self,
        title: str,
        severity: str,
        services: Iterable[str] | str,
        by: str,
        projects: Iterable[str] | str | None = None,
        message: str = "",
        now: float | None = None,
    ) -> Incident:
        """Open an incident; bad input is refused naming the field."""
        now = time.time() if now is None else now
        if not title or not str(title).strip():
            raise SchedulerError("say what is broken (users read it)", field="title")
        sev, svc, proj, who = (
            _severity(severity),
            _services(services),
            _projects(projects),
            _who(by),
        )
        updates = [{"at": now, "by": who, "message": message.strip() or "opened", "severity": sev}]
        with self._db() as conn:
            cur = conn.execute(
                "INSERT INTO incidents (title, severity, services, projects, opened_by, "
                "opened_at, updates) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    str(title).strip(),
                    sev,
                    json.dumps(svc),
                    json.dumps(proj),
                    who,
                    now,
                    json.dumps(updates),
                ),
            )
            return self._get(conn, int(cur.lastrowid))

    def update(
        self,
        incident_id: int,
        by: str,
        message: str,
        severity: str | None = None,
        services: Iterable[str] | str | None = None,
        projects: Iterable[str] | str | None = None,
        now: float | None = None,
    ) -> Incident:
        """Add a timeline entry; optionally change severity, services or projects."""
        now = time.time() if now is None else now
        who = _who(by)
        if not message or not message.strip():
            raise SchedulerError("say what changed (users read it)", field="message")
        with self._db() as conn:
            incident = self._get(conn, incident_id)
            if incident.status == "closed":
                raise SchedulerError(
                    f"incident {incident_id} was closed by {incident.closed_by}; open a new one",
                    status=409,
                    field="id",
                )
            entry: dict[str, Any] = {"at": now, "by": who, "message": message.strip()}
            sev, svc, proj = incident.severity, incident.services, incident.projects
            if severity is not None:
                sev = entry["severity"] = _severity(severity)
            if services is not None:
                svc = _services(services)
                entry["services"] = list(svc)
            if projects is not None:
                proj = _projects(projects)
                entry["projects"] = list(proj)
            conn.execute(
                "UPDATE incidents SET severity=?, services=?, projects=?, updates=? WHERE id=?",
                (
                    sev,
                    json.dumps(svc),
                    json.dumps(proj),
                    json.dumps([*incident.updates, entry]),
                    incident_id,
                ),
            )
            return self._get(conn, incident_id)

    def close(
        self, incident_id: int, by: str, message: str = "", now: float | None = None
    ) -> Incident:
        now = time.time() if now is None else now
        who = _who(by)
        with self._db() as conn:
            incident = self._get(conn, incident_id)
            if incident.status == "closed":
                raise SchedulerError(
                    f"incident {incident_id} was already closed by {incident.closed_by}",
                    status=409,
                    field="id",
                )
            entry = {"at": now, "by": who, "message": message.strip() or "resolved"}
            conn.execute(
                "UPDATE incidents SET status='closed', closed_by=?, closed_at=?, updates=? "
                "WHERE id=?",
                (who, now, json.dumps([*incident.updates, entry]), incident_id),
            )
            return self._get(conn, incident_id)

    def _get(self, conn: sqlite3.Connection, incident_id: int) -> Incident:
        row = conn.execute("SELECT * FROM incidents WHERE id=?", (int(incident_id),)).fetchone()
        if row is None:
            raise SchedulerError(f"no incident with id {incident_id}", status=404, field="id")
        return _row(row)

    def get(self, incident_id: int) -> Incident:
        with self._db() as conn:
            return self._get(conn, incident_id)

    def list(self, *, all_: bool = False) -> list[Incident]:
        """Open incidents, most severe first then oldest (``all_``: every one, newest first)."""
        with self._db() as conn:
            if all_:
                rows = conn.execute("SELECT * FROM incidents ORDER BY id DESC").fetchall()
                return [_row(r) for r in rows]
            rows = conn.execute("SELECT * FROM incidents WHERE status='open'").fetchall()
        found = [_row(r) for r in rows]
        return sorted(found, key=lambda i: (-SEVERITIES.index(i.severity), i.opened_at, i.id))


def incident_banner(incidents: Iterable[Incident], projects: Iterable[str] = ()) -> str:
    """The hub banner's incident lines (HTML, escaped): every open incident that affects
    everyone, and those naming one of ``projects`` (the viewer's)."""
    wanted = set(projects)
    parts = []
    for i in incidents:
        if i.status != "open" or not i.affects(wanted):
            continue
        latest = i.updates[-1]["message"] if i.updates else ""
        text = (
            f"Incident ({i.severity}) since {_fmt(i.opened_at)}: {i.title} "
            f"(affects: {', '.join(i.services)}"
            + (f"; projects {', '.join(i.projects)}" if i.projects else "")
            + ")"
            + (f" — latest: {latest}" if latest and latest != "opened" else "")
        )
        parts.append(html.escape(text))
    return "<br>".join(parts)
