"""Beamtime windows: request → approve/deny → active → ended, persisted across restarts."""

from __future__ import annotations

import pytest

from beamhub.kernels.reservations import ReservationBook
from beamhub.kernels.scheduler import SchedulerError

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
        "approved",
        "active",
        "active",
        "ended",
    ]
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


def test_separation_of_duties_refuses_approving_ones_own_request(tmp_path):
    """moderate/leadership: an admin who requested a window cannot approve it herself."""
    strict = ReservationBook(
        tmp_path / "res.sqlite", admins={"root", "alice"}, separate_duties=True
    )
    wid = strict.request("p1", T0 + 10, T0 + 20, "beamtime", "SFX", "alice", now=T0)
    with pytest.raises(SchedulerError, match="separation of duties: 'alice' requested") as err:
        strict.approve(wid, "alice", now=T0)
    assert (err.value.status, err.value.field) == (403, "admin")
    assert strict.get(wid).status == "requested"
    assert strict.approve(wid, "root", now=T0).decided_by == "root"
    # without separation of duties (dev, open) the same approval is allowed
    lax = ReservationBook(tmp_path / "lax.sqlite", admins={"alice"})
    wid = lax.request("p1", T0 + 10, T0 + 20, "beamtime", "SFX", "alice", now=T0)
    assert lax.approve(wid, "alice", now=T0).status == "approved"


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
    with pytest.raises(
        SchedulerError, match=f"overlaps the approved window {first} of project 'p1'"
    ):
        book.approve(second, "root", now=T0)
    with pytest.raises(SchedulerError, match="overlaps") as err:
        book.request("p1", T0 + 50, T0 + 101, "beamtime", "c", "alice", now=T0)
    assert err.value.status == 409
    # touching windows do not overlap; other projects are independent
    book.approve(
        book.request("p1", T0 + 200, T0 + 300, "beamtime", "d", "alice", now=T0), "root", now=T0
    )
    book.approve(
        book.request("p2", T0 + 100, T0 + 200, "beamtime", "e", "carol", now=T0), "root", now=T0
    )
    assert book.get(second).status == "requested"


def test_unknown_window_id(book):
    with pytest.raises(SchedulerError, match="no window with id 99") as err:
        book.approve(99, "root")
    assert err.value.status == 404


def _cli(home, *args, admins=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "BEAMHUB_HOME": str(home)}
    env.pop("BEAMHUB_SCHEDULER_ADMINS", None)
    if admins:
        env["BEAMHUB_SCHEDULER_ADMINS"] = admins
    beamhub = Path(sys.executable).with_name("beamhub")
    return subprocess.run(
        [str(beamhub), "scheduler", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.timeout(60)
def test_admin_cli_round_trip(tmp_path):
    import json

    out = _cli(
        tmp_path,
        "reservation",
        "request",
        "--project",
        "lcls01",
        "--start",
        "now",
        "--end",
        "+2h",
        "--justification",
        "SFX run 7",
        "--as",
        "alice",
    )
    assert out.returncode == 0, out.stderr
    assert "window 1 requested" in out.stdout
    bad = _cli(
        tmp_path,
        "reservation",
        "request",
        "--project",
        "lcls01",
        "--start",
        "+2h",
        "--end",
        "+1h",
        "--justification",
        "x",
    )
    assert bad.returncode == 2 and "before it starts" in bad.stderr and "status 400" in bad.stderr
    refused = _cli(tmp_path, "reservation", "approve", "1", "--as", "alice", admins="root")
    assert refused.returncode == 2 and "not a scheduler admin" in refused.stderr
    ok = _cli(tmp_path, "reservation", "approve", "1", "--as", "root", admins="root")
    assert ok.returncode == 0 and "approved by root; now active" in ok.stdout
    listed = json.loads(_cli(tmp_path, "reservation", "list", "--json").stdout)
    assert [(w["id"], w["state"], w["justification"]) for w in listed] == [
        (1, "active", "SFX run 7")
    ]
    tiers = json.loads(_cli(tmp_path, "tiers", "--json").stdout)
    assert [t["name"] for t in tiers] == ["beamtime", "interactive", "normal", "batch"]
    jobs = _cli(tmp_path, "jobs", "--json")
    assert jobs.returncode == 0 and json.loads(jobs.stdout) == []


@pytest.mark.timeout(60)
def test_cli_job_listing_leaves_out_the_env(tmp_path):
    """A job's env may hold a spawned server's API tokens: `scheduler jobs --json` omits it."""
    import json

    from beamhub.kernels.local_store import LocalJob, LocalJobStore
    from beamhub.kernels.scheduler import JobSpec

    spec = JobSpec(
        name="srv",
        project="lcls01",
        user="alice",
        tier="interactive",
        argv=["true"],
        env={"JUPYTERHUB_API_TOKEN": "s3cr3t"},
    )
    LocalJobStore(tmp_path / "scheduler" / "local-jobs.sqlite").save(LocalJob(1, spec, 10))
    out = _cli(tmp_path, "jobs", "--json")
    assert out.returncode == 0, out.stderr
    assert [j["spec"]["user"] for j in json.loads(out.stdout)] == ["alice"]
    assert "s3cr3t" not in out.stdout
