"""The maintenance calendar: windows as data, each naming what it takes down (the rest stays up).

A maintenance window takes some of :data:`SERVICES` down for ``[start, end)``; every other
service "remains operational". A beamtime needs :data:`BEAMTIME_NEEDS`: approving a beamtime
window that overlaps maintenance of one of those is refused naming both windows
(:meth:`ReservationBook.approve <beamhub.kernels.reservations.ReservationBook.approve>`), unless an
admin overrides it with a justification. Adding maintenance over approved beamtime is allowed
(the facility may have to) and answers the projects it affects. Both calendars are published as
one RFC 5545 feed (:func:`icalendar_feed`). The windows live in the reservation book's SQLite
file, so one file holds both calendars.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from beamhub.kernels.scheduler import SchedulerError
from beamhub.kernels.sqlite_db import open_book, transaction

__all__ = [
    "BEAMTIME_NEEDS",
    "SERVICES",
    "Maintenance",
    "MaintenanceCalendar",
    "affected_beamtime",
    "announcement",
    "icalendar_feed",
]

#: What a maintenance window may take down.
SERVICES = ("hub", "tokens", "gateway", "dashboard", "dsn", "scheduler", "storage", "network")
#: What a beamtime cannot run without: its notebooks (hub, tokens), the stream (dsn), its
#: reserved nodes (scheduler), the data (storage) and the network between them.
BEAMTIME_NEEDS = frozenset({"hub", "tokens", "dsn", "scheduler", "storage", "network"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS maintenance (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    start REAL NOT NULL,
    end REAL NOT NULL,
    what TEXT NOT NULL,
    down TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'scheduled',
    cancelled_by TEXT,
    cancelled_at REAL,
    reason TEXT,
    source_uid TEXT UNIQUE
);
"""


def _fmt(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class Maintenance:
    """One maintenance window: ``down`` services are unavailable in [start, end)."""

    id: int
    start: float
    end: float
    what: str
    down: tuple[str, ...]
    created_by: str
    created_at: float
    status: str = "scheduled"  # scheduled | cancelled
    cancelled_by: str | None = None
    cancelled_at: float | None = None
    reason: str | None = None
    #: the UID of the iCalendar event it was imported from (another facility's feed)
    source_uid: str | None = None

    @property
    def stays_up(self) -> tuple[str, ...]:
        return tuple(s for s in SERVICES if s not in self.down)

    def state(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.status == "cancelled":
            return "cancelled"
        if now < self.start:
            return "scheduled"
        return "ongoing" if now < self.end else "done"

    def describe(self) -> str:
        return (
            f"maintenance {self.id} {self.what!r} ({_fmt(self.start)} to {_fmt(self.end)}, "
            f"down: {', '.join(self.down)})"
        )

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        data = dict(self.__dict__)
        data.update(
            down=list(self.down),
            stays_up=list(self.stays_up),
            state=self.state(now),
            start_iso=datetime.fromtimestamp(self.start, UTC).isoformat(),
            end_iso=datetime.fromtimestamp(self.end, UTC).isoformat(),
        )
        return data


def _row(row: sqlite3.Row) -> Maintenance:
    data = dict(row)
    data["down"] = tuple(json.loads(data["down"]))
    return Maintenance(**data)


class MaintenanceCalendar:
    """Maintenance windows in SQLite (``db_path``: the reservation book's file)."""

    def __init__(self, db_path: str | Path) -> None:
        self.db_path = open_book(db_path, _SCHEMA)

    def _db(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.db_path)

    def add(
        self,
        start: float,
        end: float,
        what: str,
        down: Iterable[str],
        created_by: str,
        now: float | None = None,
        source_uid: str | None = None,
    ) -> Maintenance:
        """Schedule a window; bad input is refused naming the field."""
        now = time.time() if now is None else now
        try:
            start, end = float(start), float(end)
        except (TypeError, ValueError):
            raise SchedulerError("start and end must be epoch seconds", field="start") from None
        if end <= start:
            raise SchedulerError(
                f"maintenance ends ({_fmt(end)}) before it starts ({_fmt(start)})", field="end"
            )
        if end <= now:
            raise SchedulerError(f"maintenance already ended at {_fmt(end)}", field="end")
        if not what or not str(what).strip():
            raise SchedulerError("say what the maintenance is (users read it)", field="what")
        if isinstance(down, str):
            down = [down]
        down = tuple(dict.fromkeys(str(s).strip() for s in down))
        unknown = [s for s in down if s not in SERVICES]
        if not down or unknown:
            raise SchedulerError(
                f"down: {', '.join(map(repr, unknown)) or 'nothing'}; name what the maintenance "
                f"takes down, from {', '.join(SERVICES)} (the rest stays up)",
                field="down",
            )
        if not created_by or not str(created_by).strip():
            raise SchedulerError("created_by must name the admin", field="created_by")
        with self._db() as conn:
            cur = conn.execute(
                "INSERT INTO maintenance (start, end, what, down, created_by, created_at, "
                "source_uid) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (start, end, str(what).strip(), json.dumps(down), created_by, now, source_uid),
            )
            return self._get(conn, int(cur.lastrowid))

    def cancel(
        self, maintenance_id: int, by: str, reason: str = "", now: float | None = None
    ) -> Maintenance:
        now = time.time() if now is None else now
        with self._db() as conn:
            window = self._get(conn, maintenance_id)
            if window.status == "cancelled":
                raise SchedulerError(
                    f"maintenance {maintenance_id} was already cancelled by {window.cancelled_by}",
                    status=409,
                    field="id",
                )
            conn.execute(
                "UPDATE maintenance SET status='cancelled', cancelled_by=?, cancelled_at=?, "
                "reason=? WHERE id=?",
                (by, now, reason.strip() or None, maintenance_id),
            )
            return self._get(conn, maintenance_id)

    def _get(self, conn: sqlite3.Connection, maintenance_id: int) -> Maintenance:
        row = conn.execute(
            "SELECT * FROM maintenance WHERE id=?", (int(maintenance_id),)
        ).fetchone()
        if row is None:
            raise SchedulerError(
                f"no maintenance window with id {maintenance_id}", status=404, field="id"
            )
        return _row(row)

    def get(self, maintenance_id: int) -> Maintenance:
        with self._db() as conn:
            return self._get(conn, maintenance_id)

    def list(self, *, all_: bool = False, now: float | None = None) -> list[Maintenance]:
        """Windows not yet over and not cancelled (``all_``: every one), earliest first."""
        now = time.time() if now is None else now
        with self._db() as conn:
            if all_:
                rows = conn.execute("SELECT * FROM maintenance ORDER BY start, id").fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM maintenance WHERE status='scheduled' AND end > ? "
                    "ORDER BY start, id",
                    (now,),
                ).fetchall()
        return [_row(r) for r in rows]

    def import_ics(
        self, data: bytes, down: Iterable[str], created_by: str, now: float | None = None
    ) -> dict[str, list[int]]:
        """Import another facility's maintenance feed (RFC 5545): each event not over yet becomes
        a window taking ``down`` down (what the facility's outage means here; events in the
        BEAMTIME category, as in a beamhub feed, are not maintenance); an event seen
        before (same UID) is not added again, and one now ``STATUS:CANCELLED`` cancels its
        window. Returns the ids ``added``, ``cancelled`` and ``known``."""
        from icalendar import Calendar

        now = time.time() if now is None else now
        try:
            cal = Calendar.from_ical(data)
        except ValueError as exc:
            raise SchedulerError(f"not an iCalendar feed: {exc}", field="feed") from None
        with self._db() as conn:
            imported = {
                r["source_uid"]: (r["id"], r["status"])
                for r in conn.execute(
                    "SELECT id, status, source_uid FROM maintenance WHERE source_uid IS NOT NULL"
                )
            }
        out: dict[str, list[int]] = {"added": [], "cancelled": [], "known": []}
        for event in cal.walk("VEVENT"):
            uid = str(event.get("uid") or "")
            if not uid or "dtstart" not in event:
                raise SchedulerError("every event needs a UID and a DTSTART", field="feed")
            start = _event_time(event.decoded("dtstart"))
            end = _event_time(event.decoded("dtend")) if "dtend" in event else start + 3600
            cancelled = str(event.get("status", "")).upper() == "CANCELLED"
            if "BEAMTIME" in _categories(event):  # a beamhub feed's beamtime: not maintenance
                continue
            if uid in imported:
                wid, status = imported[uid]
                if cancelled and status != "cancelled":
                    self.cancel(wid, created_by, "cancelled in the imported feed", now)
                    out["cancelled"].append(wid)
                else:
                    out["known"].append(wid)
                continue
            if cancelled or end <= now:
                continue
            what = str(event.get("summary") or "maintenance (imported)")
            added = self.add(start, end, what, down, created_by, now, source_uid=uid)
            out["added"].append(added.id)
        return out

    def conflicts(
        self, start: float, end: float, needs: Iterable[str] = BEAMTIME_NEEDS
    ) -> list[Maintenance]:
        """Scheduled maintenance overlapping [start, end) that takes down something needed."""
        needed = set(needs)
        with self._db() as conn:
            rows = conn.execute(
                "SELECT * FROM maintenance WHERE status='scheduled' AND start < ? AND end > ? "
                "ORDER BY start, id",
                (end, start),
            ).fetchall()
        return [m for m in map(_row, rows) if needed & set(m.down)]


def _categories(event: Any) -> set[str]:
    found: set[str] = set()
    values = event.get("categories")
    for value in values if isinstance(values, list) else [values] if values else []:
        found |= {str(c).upper() for c in getattr(value, "cats", [value])}
    return found


def _event_time(value: Any) -> float:
    """An iCalendar DATE or DATE-TIME as epoch seconds (floating times and dates as UTC)."""
    if not isinstance(value, datetime):  # a DATE: the day from midnight UTC
        value = datetime(value.year, value.month, value.day, tzinfo=UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def icalendar_feed(
    maintenance: Iterable[Maintenance], beamtime: Iterable[Any], name: str = "beamhub"
) -> bytes:
    """Both calendars as one RFC 5545 VCALENDAR: maintenance windows (cancelled ones with
    STATUS:CANCELLED, so a subscribed calendar removes them) and approved beamtime windows."""
    from icalendar import Calendar, Event

    cal = Calendar()
    cal.add("prodid", f"-//beamhub//{name} calendar//EN")
    cal.add("version", "2.0")
    cal.add("calscale", "GREGORIAN")
    cal.add("x-wr-calname", f"{name}: maintenance and beamtime")
    stamp = datetime.now(UTC)
    for m in maintenance:
        ev = Event()
        ev.add("uid", f"maintenance-{m.id}@{name}")
        ev.add("dtstamp", stamp)
        ev.add("dtstart", datetime.fromtimestamp(m.start, UTC))
        ev.add("dtend", datetime.fromtimestamp(m.end, UTC))
        ev.add("summary", f"Maintenance: {m.what}")
        ev.add(
            "description",
            f"Down: {', '.join(m.down)}. Stays up: {', '.join(m.stays_up) or 'nothing'}.",
        )
        ev.add("categories", ["MAINTENANCE"])
        ev.add("status", "CANCELLED" if m.status == "cancelled" else "CONFIRMED")
        cal.add_component(ev)
    for w in beamtime:
        ev = Event()
        ev.add("uid", f"beamtime-{w.id}@{name}")
        ev.add("dtstamp", stamp)
        ev.add("dtstart", datetime.fromtimestamp(w.start, UTC))
        ev.add("dtend", datetime.fromtimestamp(w.end, UTC))
        ev.add("summary", f"Beamtime: project {w.project} ({w.tier})")
        ev.add("categories", ["BEAMTIME"])
        ev.add("status", "CONFIRMED")
        cal.add_component(ev)
    return cal.to_ical()


def affected_beamtime(window: Maintenance, beamtime: Iterable[Any]) -> list[Any]:
    """Approved beamtime windows that ``window`` overlaps and takes something needed from."""
    if not BEAMTIME_NEEDS & set(window.down):
        return []
    return [
        w
        for w in beamtime
        if w.status == "approved" and w.start < window.end and w.end > window.start
    ]


def announcement(
    calendar: MaintenanceCalendar,
    beamtime: Iterable[Any] = (),
    projects: Iterable[str] = (),
    now: float | None = None,
    horizon_s: float = 7 * 86400,
) -> str:
    """The hub's banner (HTML, escaped): maintenance ongoing or starting within ``horizon_s``,
    and, for a member of ``projects``, which of their approved ``beamtime`` windows it overlaps."""
    import html

    now = time.time() if now is None else now
    soon = [m for m in calendar.list(now=now) if m.start < now + horizon_s]
    wanted = set(projects)
    mine = [w for w in beamtime if w.project in wanted]
    parts = []
    for m in soon:
        when = "now" if m.state(now) == "ongoing" else f"from {_fmt(m.start)}"
        text = (
            f"Maintenance {when} to {_fmt(m.end)}: {m.what} "
            f"(down: {', '.join(m.down)}; stays up: {', '.join(m.stays_up) or 'nothing'})"
        )
        hits = sorted({w.project for w in affected_beamtime(m, mine)})
        if hits:
            text += f" — it overlaps the approved beamtime of {', '.join(hits)}"
        parts.append(html.escape(text))
    return "<br>".join(parts)
