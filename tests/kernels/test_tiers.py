"""Tiers, project inheritance and the effective-tier policy (window edges with explicit `now`)."""

from __future__ import annotations

import pytest

from beamhub.kernels.projects import ProjectDirectory
from beamhub.kernels.reservations import ReservationBook
from beamhub.kernels.scheduler import JobSpec, SchedulerError
from beamhub.kernels.tier_policy import TierPolicy
from beamhub.kernels.tiers import DEFAULT_TIERS, load_tiers

T0 = 2_000_000_000.0  # a fixed clock: windows below are relative to it


@pytest.fixture
def projects():
    return ProjectDirectory.from_dict(
        {
            "projects": {
                "lcls01": {
                    "tiers": ["interactive", "normal", "batch"],
                    "members": ["alice", "bob"],
                },
                "chem02": {"tiers": ["batch"], "members": ["carol"]},
            }
        }
    )


@pytest.fixture
def book(tmp_path):
    return ReservationBook(tmp_path / "res.sqlite", admins={"root"})


@pytest.fixture
def policy(projects, book):
    return TierPolicy(DEFAULT_TIERS, projects, book)


def test_default_tiers_order_and_preemption():
    assert DEFAULT_TIERS.names() == ["beamtime", "interactive", "normal", "batch"]
    beam, inter, batch = (
        DEFAULT_TIERS["beamtime"],
        DEFAULT_TIERS["interactive"],
        DEFAULT_TIERS["batch"],
    )
    assert beam.can_preempt(batch)
    assert not beam.can_preempt(inter)
    assert not batch.can_preempt(beam)
    assert batch.preempt_mode == "requeue"
    assert beam.window_only


def test_tier_config_refuses_preempting_a_higher_tier():
    with pytest.raises(SchedulerError, match="only lower tiers"):
        load_tiers(
            {
                "tiers": {"a": {"priority": 1, "preempts": ["b"]}, "b": {"priority": 2}},
                "default_tier": "a",
            }
        )
    with pytest.raises(SchedulerError, match="preempt_mode"):
        load_tiers(
            {"tiers": {"a": {"priority": 1, "preempt_mode": "suspend"}}, "default_tier": "a"}
        )
    with pytest.raises(SchedulerError, match="unknown field"):
        load_tiers({"tiers": {"a": {"priority": 1, "colour": "red"}}, "default_tier": "a"})


def test_members_inherit_the_project_tiers(policy):
    assert policy.granted("alice", "lcls01") == ["interactive", "normal", "batch"]
    assert policy.effective_tier("bob", "lcls01", None, now=T0).name == "interactive"
    assert policy.effective_tier("carol", "chem02", None, now=T0).name == "batch"
    assert policy.effective_tier("alice", "lcls01", "batch", now=T0).name == "batch"


def test_user_without_the_tier_is_refused_with_the_reason(policy):
    with pytest.raises(SchedulerError) as err:
        policy.effective_tier("carol", "chem02", "interactive", now=T0)
    assert err.value.status == 403
    assert "does not hold tier 'interactive'" in err.value.message
    assert "held: batch" in err.value.message
    with pytest.raises(SchedulerError, match="not a member of project 'lcls01'") as err:
        policy.effective_tier("carol", "lcls01", None, now=T0)
    assert err.value.status == 403
    with pytest.raises(SchedulerError, match="only held inside an approved beamtime window"):
        policy.effective_tier("alice", "lcls01", "beamtime", now=T0)


def test_unknown_tier_and_project_are_refused(policy):
    with pytest.raises(SchedulerError, match=r"unknown tier 'gold'.*beamtime, interactive") as err:
        policy.effective_tier("alice", "lcls01", "gold", now=T0)
    assert err.value.field == "tier"
    with pytest.raises(SchedulerError, match="unknown project 'nope'") as err:
        policy.effective_tier("alice", "nope", None, now=T0)
    assert err.value.status == 404


def test_window_only_tier_cannot_be_granted_directly():
    with pytest.raises(SchedulerError, match="window-only tier"):
        ProjectDirectory.from_dict({"projects": {"p": {"tiers": ["beamtime"], "members": ["a"]}}})


def test_window_edges_open_and_close_elevation(policy, book):
    wid = book.request("lcls01", T0 + 100, T0 + 200, "beamtime", "SFX run 42", "alice", now=T0)
    # requested but not approved: no elevation
    assert policy.effective_tier("alice", "lcls01", None, now=T0 + 150).name == "interactive"
    book.approve(wid, "root", now=T0)
    eff = policy.effective_tier
    assert eff("alice", "lcls01", None, now=T0 + 99.999).name == "interactive"
    assert eff("alice", "lcls01", None, now=T0 + 100).name == "beamtime"  # start is inclusive
    assert eff("bob", "lcls01", None, now=T0 + 199.999).name == "beamtime"  # every member
    assert eff("alice", "lcls01", None, now=T0 + 200).name == "interactive"  # end is exclusive
    assert eff("alice", "lcls01", "beamtime", now=T0 + 150).name == "beamtime"
    with pytest.raises(SchedulerError, match="next window opens at"):
        eff("alice", "lcls01", "beamtime", now=T0 + 50)
    with pytest.raises(SchedulerError, match="only held inside"):
        eff("alice", "lcls01", "beamtime", now=T0 + 200)
    # an explicit lower request inside the window is honoured (batch work stays batch)
    assert eff("alice", "lcls01", "batch", now=T0 + 150).name == "batch"
    # another project's window elevates nobody else
    assert eff("carol", "chem02", None, now=T0 + 150).name == "batch"


def test_spec_over_the_tier_limits_is_refused(policy):
    spec = JobSpec(
        name="j",
        project="lcls01",
        user="alice",
        tier="interactive",
        argv=["true"],
        walltime_s=DEFAULT_TIERS["interactive"].max_walltime_s + 1,
    )
    with pytest.raises(SchedulerError, match="walltime_s=28801 is over tier 'interactive'") as err:
        policy.check(spec, now=T0)
    assert err.value.field == "walltime_s"
    spec.walltime_s, spec.nodes = 60, 2
    with pytest.raises(SchedulerError, match="nodes=2 is over tier 'interactive'"):
        policy.check(spec, now=T0)


def test_spec_validation_names_the_field():
    with pytest.raises(SchedulerError, match="argv must be a non-empty list") as err:
        JobSpec(name="j", project="p", user="u", tier="batch", argv="sleep 1").validate()
    assert err.value.field == "argv"
    with pytest.raises(SchedulerError, match="cpus must be a positive integer"):
        JobSpec(name="j", project="p", user="u", tier="batch", argv=["x"], cpus=0).validate()
