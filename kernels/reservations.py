"""QoS reservations: a project's approved beamtime windows elevate its jobs, no node sits idle."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from beamhub.kernels.maintenance import MaintenanceCalendar
from beamhub.kernels.scheduler import SchedulerError
from beamhub.kernels.sqlite_db import transaction
from beamhub.kernels.tiers import DEFAULT_TIERS, TierSet

__all__ = ["ReservationBook", "Window"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    start REAL NOT NULL,
    end REAL NOT NULL,
    tier TEXT NOT NULL,
    justification TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'requested',
    decided_by TEXT,
    decided_at REAL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS windows_project ON windows (project, status, start);
"""


@dataclass(frozen=True)
class Window:
    """A beamtime window: [start, end) in epoch seconds, at an elevated tier."""

    id: int
    project: str
    start: float
    end: float
    tier: str
    justification: str
    requested_by: str
    created_at: float
    status: str  # stored decision: requested | approved | denied
    decided_by: str | None = None
    decided_at: float | None = None
    reason: str | None = None

    def contains(self, now: float) -> bool:
        return self.start <= now < self.end

    def state(self, now: float | None = None) -> str:
        """requested → approved/denied → active → ended (active/ended derive from the clock);
        a request nobody decided before its end is ``expired``."""
        now = time.time() if now is None else now
        if self.status == "approved":
            if now < self.start:
                return "approved"
            return "active" if now < self.end else "ended"
        if self.status == "requested" and now >= self.end:
            return "expired"
        return self.status

    def to_dict(self, now: float | None = None) -> dict:
        data = dict(self.__dict__)
        data["state"] = self.state(now)
        return data


class ReservationBook:
    """Beamtime windows in SQLite: requested by a project member, approved or denied by an admin.

    ``admins``: names allowed to approve/deny. ``None`` trusts the caller (the admin CLI
    on the hub machine, which can open the database anyway).
    """

    def __init__(
        self,
        db_path: str | Path,
        tiers: TierSet | None = None,
        admins: Iterable[str] | None = None,
        separate_duties: bool = False,
    ) -> None:
        self.db_path = Path(db_path)
        self.tiers = tiers or DEFAULT_TIERS
        self.admins = None if admins is None else frozenset(admins)
        #: the approver of a window may not be its requester (moderate and leadership enclaves)
        self.separate_duties = separate_duties
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as conn:
            conn.executescript(_SCHEMA)
        #: the maintenance calendar (same file): approval checks the beamtime against it
        self.maintenance = MaintenanceCalendar(self.db_path)

    def _db(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.db_path)

    # -- writes ---------------------------------------------------------------------------
    def request(
        self,
        project: str,
        start: float,
        end: float,
        tier: str,
        justification: str,
        requested_by: str,
        now: float | None = None,
    ) -> int:
        """File a window request; returns its id. Bad input is refused with the reason."""
        now = time.time() if now is None else now
        if not project or not str(project).strip():
            raise SchedulerError("project must not be empty", field="project")
        if not requested_by or not str(requested_by).strip():
            raise SchedulerError("requested_by must name the requesting user", field="requested_by")
        try:
            start, end = float(start), float(end)
        except (TypeError, ValueError) as exc:
            raise SchedulerError("start and end must be epoch seconds", field="start") from exc
        if end <= start:
            raise SchedulerError(
                f"window ends ({_fmt(end)}) before it starts ({_fmt(start)}); give an end after "
                "the start",
                field="end",
            )
        if end <= now:
            raise SchedulerError(f"window already ended at {_fmt(end)}", field="end")
        self.tiers.get(tier)  # unknown tier → clear error naming the known ones
        if not justification or not justification.strip():
            raise SchedulerError(
                "a written justification is required (what the beamtime is for)",
                field="justification",
            )
        with self._db() as conn:
            self._refuse_overlap(conn, project, start, end, exclude=None)
            cur = conn.execute(
                "INSERT INTO windows (project, start, end, tier, justification, requested_by, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (project, start, end, tier, justification.strip(), requested_by, now),
            )
            return int(cur.lastrowid)

    def approve(
        self, window_id: int, admin: str, now: float | None = None, override: str | None = None
    ) -> Window:
        """Approve a requested window (admins only). A window that overlaps maintenance taking
        down what a beamtime needs is refused naming both, unless ``override`` justifies it
        (kept as the window's ``reason``; the caller audits it)."""
        if override is not None and not override.strip():
            raise SchedulerError(
                "an override of a maintenance window needs a written justification",
                field="override",
            )
        return self._decide(window_id, admin, "approved", override, now)

    def deny(self, window_id: int, admin: str, reason: str, now: float | None = None) -> Window:
        """Deny a requested window with a reason the requester will read (admins only)."""
        if not reason or not reason.strip():
            raise SchedulerError("a reason is required to deny a window", field="reason")
        return self._decide(window_id, admin, "denied", reason.strip(), now)

    def _decide(
        self, window_id: int, admin: str, status: str, reason: str | None, now: float | None
    ) -> Window:
        now = time.time() if now is None else now
        if self.admins is not None and admin not in self.admins:
            raise SchedulerError(
                f"{admin!r} is not a scheduler admin; only admins may approve or deny windows",
                status=403,
                field="admin",
            )
        with self._db() as conn:
            window = self._get(conn, window_id)
            if window.status != "requested":
                raise SchedulerError(
                    f"window {window_id} is already {window.status} by {window.decided_by}",
                    status=409,
                    field="id",
                )
            if status == "approved" and self.separate_duties and admin == window.requested_by:
                raise SchedulerError(
                    f"separation of duties: {admin!r} requested window {window_id} and may not "
                    "approve it too; another admin must",
                    status=403,
                    field="admin",
                )
            if status == "approved":
                if window.end <= now:
                    raise SchedulerError(f"window {window_id} already ended", status=409)
                self._refuse_overlap(conn, window.project, window.start, window.end, window_id)
                clashes = self.maintenance.conflicts(window.start, window.end)
                if clashes and reason is None:
                    raise SchedulerError(
                        f"window {window_id} of project {window.project!r} ({_fmt(window.start)} "
                        f"to {_fmt(window.end)}) overlaps "
                        + "; ".join(m.describe() for m in clashes)
                        + ", which takes down what a beamtime needs; pick another time, or "
                        "override with a written justification (audited)",
                        status=409,
                        field="override",
                    )
                if clashes:
                    reason = (
                        f"approved over maintenance {', '.join(str(m.id) for m in clashes)}: "
                        f"{reason.strip()}"
                    )
                else:
                    reason = None  # nothing to override
            conn.execute(
                "UPDATE windows SET status=?, decided_by=?, decided_at=?, reason=? WHERE id=?",
                (status, admin, now, reason, window_id),
            )
            return self._get(conn, window_id)

    def _refuse_overlap(
        self, conn: sqlite3.Connection, project: str, start: float, end: float, exclude: int | None
    ) -> None:
        row = conn.execute(
            "SELECT * FROM windows WHERE project=? AND status='approved' AND start < ? "
            "AND end > ? AND id IS NOT ? ORDER BY start LIMIT 1",
            (project, end, start, exclude),
        ).fetchone()
        if row is not None:
            other = _window(row)
            raise SchedulerError(
                f"window {_fmt(start)} to {_fmt(end)} overlaps the approved "
                f"window {other.id} of project {project!r} ({_fmt(other.start)} to {_fmt(other.end)}); "
                "pick another time",
                status=409,
                field="start",
            )

    # -- reads ----------------------------------------------------------------------------
    def _get(self, conn: sqlite3.Connection, window_id: int) -> Window:
        row = conn.execute("SELECT * FROM windows WHERE id=?", (int(window_id),)).fetchone()
        if row is None:
            raise SchedulerError(f"no window with id {window_id}", status=404, field="id")
        return _window(row)

    def get(self, window_id: int) -> Window:
        with self._db() as conn:
            return self._get(conn, window_id)

    def list(
        self, project: str | None = None, state: str | None = None, now: float | None = None
    ) -> list[Window]:
        """Windows, oldest start first; filter by project and/or derived state."""
        now = time.time() if now is None else now
        with self._db() as conn:
            if project is None:
                rows = conn.execute("SELECT * FROM windows ORDER BY start, id").fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM windows WHERE project=? ORDER BY start, id", (project,)
                ).fetchall()
        windows = [_window(r) for r in rows]
        if state is not None:
            windows = [w for w in windows if w.state(now) == state]
        return windows

    def active(self, project: str, now: float | None = None) -> Window | None:
        """The project's approved window open at ``now`` (start inclusive, end exclusive)."""
        now = time.time() if now is None else now
        with self._db() as conn:
            row = conn.execute(
                "SELECT * FROM windows WHERE project=? AND status='approved' AND start <= ? "
                "AND end > ? ORDER BY start LIMIT 1",
                (project, now, now),
            ).fetchone()
        return None if row is None else _window(row)

    def next_window(self, project: str, now: float | None = None) -> Window | None:
        """The project's next approved window that has not started yet."""
        now = time.time() if now is None else now
        with self._db() as conn:
            row = conn.execute(
                "SELECT * FROM windows WHERE project=? AND status='approved' AND start > ? "
                "ORDER BY start LIMIT 1",
                (project, now),
            ).fetchone()
        return None if row is None else _window(row)


def _window(row: sqlite3.Row) -> Window:
    return Window(**{k: row[k] for k in row.keys()})


def _fmt(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
