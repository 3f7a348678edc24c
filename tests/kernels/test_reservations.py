"""Beamtime windows: request → approve/deny → active → ended, persisted across restarts."""

from __future__ import annotations

import pytest

from kernels.reservations import ReservationBook
from kernels.scheduler import SchedulerError

T0 = 2_000_000_000.0


@pytest.fixture
def book(tmp_path):
    return ReservationBook(tmp_path / "res.sqlite", admins={"root"})


def test_lifecycle_states_follow_the_clock(book):
    wid = book.request("p1", T0 + 10, T0 + 20, "beamtime", "SFX", "alice", now=T0)
    assert book.get(wid).state(T0) == "requested"
    assert book.active("p1", T0 + 15) is None
    window = book.approve(wid, "root", now=T0 + 1)
    assert (window.status, window.decided_by) == ("approved", "root")
    assert [window.state(t) for t in (T0 + 9, T0 + 10, T0 + 19.9, T0 + 20)] == [
        "approved", "active", "active", "ended"]
    assert book.active("p1", T0 + 10).id == wid
    assert book.active("p1", T0 + 20) is None
    assert [w.id for w in book.list(state="active", now=T0 + 12)] == [wid]
    assert book.list(project="p2") == []


def test_windows_survive_a_restart(tmp_path):
    path = tmp_path / "res.sqlite"
    first = ReservationBook(path, admins={"root"})
    wid = first.request("p1", T0 + 10, T0 + 20, "beamtime", "SFX", "alice", now=T0)
    first.approve(wid, "root", now=T0)
    again = ReservationBook(path, admins={"root"})
    assert again.active("p1", T0 + 11).id == wid
    assert again.get(wid).justification == "SFX"


def test_deny_needs_a_reason_and_is_final(book):
    wid = book.request("p1", T0 + 10, T0 + 20, "beamtime", "SFX", "alice", now=T0)
    with pytest.raises(SchedulerError, match="reason is required"):
        book.deny(wid, "root", "  ", now=T0)
    denied = book.deny(wid, "root", "no beam that week", now=T0)
    assert denied.state(T0 + 15) == "denied"
    assert book.active("p1", T0 + 15) is None
    with pytest.raises(SchedulerError, match="already denied by root") as err:
        book.approve(wid, "root", now=T0)
    assert err.value.status == 409


def test_non_admin_cannot_approve(book):
    wid = book.request("p1", T0 + 10, T0 + 20, "beamtime", "SFX", "alice", now=T0)
    with pytest.raises(SchedulerError, match="'alice' is not a scheduler admin") as err:
        book.approve(wid, "alice", now=T0)
    assert err.value.status == 403
    assert book.get(wid).status == "requested"


@pytest.mark.parametrize(
    ("start", "end", "tier", "why", "match", "field"),
    [
        (T0 + 20, T0 + 10, "beamtime", "x", "ends .* before it starts", "end"),
        (T0 + 10, T0 + 10, "beamtime", "x", "before it starts", "end"),
        (T0 - 20, T0 - 10, "beamtime", "x", "already ended", "end"),
        (T0 + 10, T0 + 20, "gold", "x", "unknown tier 'gold'", "tier"),
        (T0 + 10, T0 + 20, "beamtime", "   ", "justification is required", "justification"),
    ],
)
def test_bad_requests_are_refused(book, start, end, tier, why, match, field):
    with pytest.raises(SchedulerError, match=match) as err:
        book.request("p1", start, end, tier, why, "alice", now=T0)
    assert err.value.field == field and err.value.status == 400
    assert book.list() == []


def test_overlapping_approved_windows_are_refused(book):
    first = book.request("p1", T0 + 100, T0 + 200, "beamtime", "a", "alice", now=T0)
    second = book.request("p1", T0 + 150, T0 + 250, "beamtime", "b", "alice", now=T0)
    book.approve(first, "root", now=T0)
    with pytest.raises(SchedulerError, match=f"overlaps the approved window {first} of project 'p1'"):
        book.approve(second, "root", now=T0)
    with pytest.raises(SchedulerError, match="overlaps") as err:
        book.request("p1", T0 + 50, T0 + 101, "beamtime", "c", "alice", now=T0)
    assert err.value.status == 409
    # touching windows do not overlap; other projects are independent
    book.approve(book.request("p1", T0 + 200, T0 + 300, "beamtime", "d", "alice", now=T0), "root", now=T0)
    book.approve(book.request("p2", T0 + 100, T0 + 200, "beamtime", "e", "carol", now=T0), "root", now=T0)
    assert book.get(second).status == "requested"


def test_unknown_window_id(book):
    with pytest.raises(SchedulerError, match="no window with id 99") as err:
        book.approve(99, "root")
    assert err.value.status == 404
