"""The options form's offer and checks against a real tier policy and a real SQLite window book:
beamtime is offered only inside an approved window, and outside one the form says when the next
one opens. (The form on a running hub: tests/hub/test_spawn_form.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from beamhub.kernels.reservations import ReservationBook
from beamhub.kernels.spawn_form import FormError, check_options, make_offer, render_form
from beamhub.kernels.tier_policy import TierPolicy

JOB_ROLES = {"pi", "operator", "member"}
T0 = 1_800_000_000.0  # 2027-01-15 08:00 UTC


def _offer(book: ReservationBook, now: float):
    return make_offer(
        TierPolicy(reservations=book),
        "oscar",
        {"p-1001": "operator", "p-2002": "viewer"},
        JOB_ROLES,
        machine_nodes=4,
        max_dask_workers=8,
        default_walltime_s=8 * 3600,
        now=now,
    )


def test_beamtime_only_inside_the_approved_window(tmp_path: Path) -> None:
    book = ReservationBook(tmp_path / "r.sqlite")
    wid = book.request("p-1001", T0 + 3600, T0 + 5 * 3600, "beamtime", "SFX run", "oscar", now=T0)
    book.approve(wid, "alice", now=T0)

    before = _offer(book, T0)
    beamtime = before.tier("p-1001", "beamtime")
    assert beamtime is not None and not beamtime.usable
    assert beamtime.reason == (
        "no approved beamtime window open for p-1001 now "
        "(next: 2027-01-15 09:00 UTC to 2027-01-15 13:00 UTC)"
    )
    assert before.best["p-1001"] == "interactive"
    assert before.watch_only == {"p-2002": "viewer"}
    with pytest.raises(FormError) as refused:
        check_options(before, {"tier": ["beamtime"]})
    assert (refused.value.status_code, refused.value.field) == (403, "tier")
    assert "(next: 2027-01-15 09:00 UTC" in refused.value.message

    inside = _offer(book, T0 + 2 * 3600)
    assert inside.best["p-1001"] == "beamtime"  # preselected inside the window
    assert 'value="beamtime" checked>' in render_form(inside)
    checked = check_options(inside, {"walltime": ["12"], "nodes": ["4"]})
    assert checked == {
        "project": "p-1001",
        "tier": "beamtime",
        "walltime_s": 43200,
        "nodes": 4,
        "dask_workers": 0,
    }
    with pytest.raises(
        FormError, match=r"^walltime: 12.5 h is over tier 'beamtime''s limit of 12 h"
    ):
        check_options(inside, {"walltime": ["12.5"]})


def test_rest_values_are_checked_like_the_form(tmp_path: Path) -> None:
    offer = _offer(ReservationBook(tmp_path / "r.sqlite"), T0)
    with pytest.raises(FormError, match=r"^walltime: 10 h is over tier 'interactive''s limit"):
        check_options(offer, {"walltime_s": 36000})
    with pytest.raises(FormError, match=r"^project: as a viewer of p-2002 you watch"):
        check_options(offer, {"project": "p-2002"})
    with pytest.raises(FormError, match=r"^dask_workers: -1 is under the minimum of 0"):
        check_options(offer, {"dask_workers": -1})
    with pytest.raises(FormError, match=r"^nodes: 'many' is not a number of nodes"):
        check_options(offer, {"nodes": "many"})
