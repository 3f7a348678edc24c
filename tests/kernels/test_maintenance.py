"""The maintenance calendar against the reservation book: refusals name both windows, an admin's
override is recorded, and both calendars come out as an RFC 5545 feed."""

from __future__ import annotations

import time

import pytest
from icalendar import Calendar

from beamhub.kernels.maintenance import affected_beamtime, icalendar_feed
from beamhub.kernels.reservations import ReservationBook
from beamhub.kernels.scheduler import SchedulerError

H = 3600.0


@pytest.fixture
def book(tmp_path) -> ReservationBook:
    return ReservationBook(tmp_path / "reservations.sqlite", admins=["root-admin"])


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"down": ["warp-drive"]}, "down", "'warp-drive'"),
        ({"down": []}, "down", "name what the maintenance takes down"),
        ({"what": " "}, "what", "say what"),
        ({"end_h": 0.5}, "end", "before it starts"),
        ({"start_h": -3, "end_h": -2}, "end", "already ended"),
    ],
)
def test_bad_maintenance_is_refused_naming_the_field(book, kwargs, field, words) -> None:
    now = time.time()
    args = {"what": "filesystem upgrade", "down": ["storage"], **kwargs}
    start = now + args.pop("start_h", 1) * H
    end = now + args.pop("end_h", 2) * H
    with pytest.raises(SchedulerError) as err:
        book.maintenance.add(start, end, args["what"], args["down"], "root-admin")
    assert err.value.field == field and words in err.value.message


def test_beamtime_over_maintenance_is_refused_naming_both_then_overridden(book) -> None:
    now = time.time()
    upgrade = book.maintenance.add(now + 2 * H, now + 4 * H, "Lustre upgrade", ["storage"], "ops")
    assert "dsn" in upgrade.stays_up and upgrade.down == ("storage",)
    wid = book.request("p-1001", now + 3 * H, now + 6 * H, "beamtime", "SFX run", "alice")
    with pytest.raises(SchedulerError) as err:
        book.approve(wid, "root-admin")
    msg = err.value.message
    assert err.value.status == 409 and err.value.field == "override"
    assert f"window {wid} of project 'p-1001'" in msg
    assert f"maintenance {upgrade.id} 'Lustre upgrade'" in msg and "down: storage" in msg
    assert book.get(wid).status == "requested"
    with pytest.raises(SchedulerError) as err:
        book.approve(wid, "root-admin", override="  ")
    assert err.value.field == "override"
    window = book.approve(wid, "root-admin", override="sample degrades; storage team agrees")
    assert window.status == "approved"
    assert window.reason == (
        f"approved over maintenance {upgrade.id}: sample degrades; storage team agrees"
    )
    assert affected_beamtime(upgrade, book.list()) == [window]


def test_maintenance_that_spares_the_beamtime_or_is_cancelled_does_not_block(book) -> None:
    now = time.time()
    board = book.maintenance.add(now + H, now + 5 * H, "dashboard restyle", ["dashboard"], "ops")
    net = book.maintenance.add(now + H, now + 5 * H, "switch firmware", ["network"], "ops")
    wid = book.request("p-1001", now + 2 * H, now + 3 * H, "beamtime", "SFX run", "alice")
    with pytest.raises(SchedulerError, match=f"maintenance {net.id} 'switch firmware'") as err:
        book.approve(wid, "root-admin")
    assert f"maintenance {board.id}" not in err.value.message  # the dashboard is not needed
    cancelled = book.maintenance.cancel(net.id, "ops", "vendor postponed")
    assert cancelled.state() == "cancelled"
    with pytest.raises(SchedulerError, match="already cancelled"):
        book.maintenance.cancel(net.id, "ops")
    assert book.approve(wid, "root-admin").reason is None
    assert [m.id for m in book.maintenance.list()] == [board.id]
    assert affected_beamtime(board, book.list()) == []


def test_both_calendars_as_an_rfc5545_feed(book) -> None:
    now = time.time()
    m = book.maintenance.add(now + H, now + 2 * H, "cooling, water; power", ["scheduler"], "ops")
    gone = book.maintenance.add(now + 5 * H, now + 6 * H, "postponed", ["hub"], "ops")
    book.maintenance.cancel(gone.id, "ops")
    wid = book.request("p-1001", now + 3 * H, now + 4 * H, "beamtime", "secret plans", "alice")
    book.approve(wid, "root-admin")
    book.request("p-2002", now + 3 * H, now + 4 * H, "beamtime", "not approved", "bob")
    approved = [w for w in book.list() if w.status == "approved"]
    raw = icalendar_feed(book.maintenance.list(all_=True), approved, "test-facility")
    assert raw.startswith(b"BEGIN:VCALENDAR\r\n") and raw.endswith(b"END:VCALENDAR\r\n")
    assert all(len(line) <= 75 for line in raw.split(b"\r\n"))  # folded (RFC 5545 3.1)
    assert b"cooling\\, water\\; power" in raw  # TEXT escaping (3.3.11)
    assert b"secret plans" not in raw  # justifications stay private
    cal = Calendar.from_ical(raw)
    events = {str(e["uid"]): e for e in cal.walk("VEVENT")}
    assert set(events) == {
        f"maintenance-{m.id}@test-facility",
        f"maintenance-{gone.id}@test-facility",
        f"beamtime-{wid}@test-facility",
    }
    ev = events[f"maintenance-{m.id}@test-facility"]
    assert ev.decoded("dtstart").timestamp() == pytest.approx(m.start, abs=1)
    assert str(ev["status"]) == "CONFIRMED" and "Down: scheduler" in str(ev["description"])
    assert str(events[f"maintenance-{gone.id}@test-facility"]["status"]) == "CANCELLED"
    assert str(events[f"beamtime-{wid}@test-facility"]["summary"]) == (
        "Beamtime: project p-1001 (beamtime)"
    )


def test_the_hub_banner_names_maintenance_and_the_members_beamtime(book) -> None:
    from beamhub.kernels.maintenance import announcement

    now = time.time()
    assert announcement(book.maintenance, book.list()) == ""
    wid = book.request("p-1001", now + 2 * H, now + 3 * H, "beamtime", "SFX run", "alice")
    book.approve(wid, "root-admin")
    book.maintenance.add(now + H, now + 4 * H, "<b>DSN</b> & router", ["dsn"], "ops")
    book.maintenance.add(now + 9 * 86400, now + 9 * 86400 + H, "far away", ["hub"], "ops")
    anyone = announcement(book.maintenance, book.list(), now=now)
    assert "&lt;b&gt;DSN&lt;/b&gt; &amp; router" in anyone and "<b>" not in anyone
    assert "down: dsn" in anyone and "far away" not in anyone  # beyond the 7 days shown
    assert "beamtime" not in anyone  # only members hear about their project's windows
    member = announcement(book.maintenance, book.list(), {"p-1001"}, now=now)
    assert member.endswith("it overlaps the approved beamtime of p-1001")


FOREIGN = """BEGIN:VCALENDAR\r
VERSION:2.0\r
PRODID:-//Light Source//Operations//EN\r
BEGIN:VEVENT\r
UID:ls-shutdown-42@lightsource.example\r
DTSTAMP:20260101T000000Z\r
DTSTART:{start}\r
DTEND:{end}\r
SUMMARY:Accelerator shutdown\\, RF upgrade\r
STATUS:{status}\r
END:VEVENT\r
BEGIN:VEVENT\r
UID:ls-past@lightsource.example\r
DTSTAMP:20260101T000000Z\r
DTSTART;VALUE=DATE:20200101\r
DTEND;VALUE=DATE:20200102\r
SUMMARY:long over\r
END:VEVENT\r
END:VCALENDAR\r
"""


def test_a_facility_feed_is_imported_once_and_its_cancellation_follows(book) -> None:
    from datetime import UTC, datetime

    now = time.time()

    def ics(status: str) -> bytes:
        fmt = "%Y%m%dT%H%M%SZ"
        start = datetime.fromtimestamp(now + H, UTC).strftime(fmt)
        end = datetime.fromtimestamp(now + 3 * H, UTC).strftime(fmt)
        return FOREIGN.format(start=start, end=end, status=status).encode()

    first = book.maintenance.import_ics(ics("CONFIRMED"), ["network", "dsn"], "ops", now)
    assert len(first["added"]) == 1 and first["cancelled"] == []  # the past event is skipped
    window = book.maintenance.get(first["added"][0])
    assert window.what == "Accelerator shutdown, RF upgrade" and window.down == ("network", "dsn")
    assert window.start == pytest.approx(now + H, abs=1)
    assert window.source_uid == "ls-shutdown-42@lightsource.example"
    again = book.maintenance.import_ics(ics("CONFIRMED"), ["network"], "ops", now)
    assert again == {"added": [], "cancelled": [], "known": [window.id]}
    off = book.maintenance.import_ics(ics("CANCELLED"), ["network"], "ops", now)
    assert off["cancelled"] == [window.id]
    assert book.maintenance.get(window.id).state() == "cancelled"
    with pytest.raises(SchedulerError) as err:
        book.maintenance.import_ics(b"not a calendar", ["network"], "ops", now)
    assert err.value.field == "feed"
