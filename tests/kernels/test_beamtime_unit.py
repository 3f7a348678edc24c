"""`beamhub beamtime plan|apply` as the real CLI: a beamtime file checked field by field against the
enclave's template, the tiers, the peak finder and the maintenance calendar; applied, its window
is requested and approved, and when it opens the channel is created on a real DSN and the
analysis job runs through a real gateway on each backend — the embedded local scheduler and SLURM
(real slurmctld/slurmd from tests/kernels/conftest.py) — and analyses the frames a simulated
detector sends."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beamhub.kernels.local import LocalBackend
from beamhub.kernels.projects import ProjectDirectory
from beamhub.kernels.reservations import ReservationBook
from beamhub.kernels.slurm import SlurmBackend
from beamhub.kernels.tier_policy import TierPolicy
from beamhub.kernels.tiers import DEFAULT_TIERS
from beamhub.streaming.simulator import SimulatedDetector
from beamhub.streaming.source import SourceRunner
from tests.hub.gateway_helpers import Keys, call, running_gateway

BEAMHUB = str(Path(sys.executable).with_name("beamhub"))
UNIT = """\
beamtime:
  project: lcls01
  justification: SFX on lysozyme, live hit finding
  window: {{start: "{start}", end: "{end}"}}
  tier: beamtime
  nodes: 1
  stream: {{name: detector, mode: l7}}
  analysis: {{workers: 2, finder: {{min_snr: 4, min_peaks_for_hit: 3}}}}
  dashboard: {{enabled: true}}
"""


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEAMHUB_", "JUPYTERHUB_"))}
    env.update(
        BEAMHUB_HOME=str(tmp / "state"),
        BEAMHUB_SCHEDULER_RESERVATIONS=str(tmp / "res.sqlite"),
        **extra,
    )
    return env


def _cli(tmp: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BEAMHUB, "beamtime", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp, **extra),
        check=False,
    )


def _deployment(tmp: Path, text: str = "enclave: dev\n") -> str:
    path = tmp / "beamhub.yaml"
    path.write_text(text)
    return str(path)


def test_plan_names_each_field_that_does_not_fit(tmp_path: Path) -> None:
    dep = _deployment(tmp_path)
    unit = tmp_path / "bt.yaml"
    unit.write_text(UNIT.format(start="+1h", end="+3h"))
    ok = _cli(tmp_path, "plan", str(unit), "--deployment", dep, "--json")
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout)
    assert plan["ok"] and plan["enclave"] == "dev" and plan["template"].endswith("default.yaml")
    assert len(plan["steps"]) == 4 and "2 worker(s)" in plan["steps"][2]
    assert plan["unit"]["end"] - plan["unit"]["start"] == pytest.approx(7200, abs=2)

    # each field the facility does not allow, named
    unit.write_text(
        UNIT.format(start="+1h", end="+3h")
        .replace("mode: l7", "mode: l9")
        .replace("nodes: 1", "nodes: 9")
        .replace("min_snr: 4", "min_snr: -1")
    )
    bad = _cli(tmp_path, "plan", str(unit), "--deployment", dep, "--json")
    assert bad.returncode == 1
    fields = {p["field"] for p in json.loads(bad.stdout)["problems"]}
    assert fields == {"beamtime.stream.mode", "beamtime.nodes", "beamtime.analysis.finder.min_snr"}
    max_nodes = DEFAULT_TIERS.get("beamtime").max_nodes
    assert f"over tier 'beamtime''s maximum of {max_nodes}" in bad.stdout

    # the shape: a missing or unknown field stops at once, naming it
    unit.write_text(
        UNIT.format(start="+1h", end="+3h").replace("  tier: beamtime\n", "  tire: x\n")
    )
    typo = _cli(tmp_path, "plan", str(unit), "--deployment", dep)
    assert typo.returncode == 2 and "beamtime.tire: unknown field" in typo.stderr
    unit.write_text(UNIT.format(start="+3h", end="+1h"))
    backwards = _cli(tmp_path, "plan", str(unit), "--deployment", dep)
    assert backwards.returncode == 2 and "beamtime.window.end:" in backwards.stderr

    # the enclave profile: its DSN's template, not another
    unit.write_text(UNIT.format(start="+1h", end="+3h").replace("mode: l7", "template: moderate"))
    other = _cli(tmp_path, "plan", str(unit), "--deployment", dep)
    assert other.returncode == 1
    assert (
        "beamtime.stream.template: 'moderate' is not the template of enclave 'dev'" in other.stdout
    )

    # a moderate enclave's DSN encrypts every channel: an unencrypted stream is refused
    moderate = tmp_path / "moderate"
    moderate.mkdir()
    mdep = _deployment(moderate, "enclave: moderate\nhub: {port: 0}\ntokens: {ttl: 300}\n")
    unit.write_text(
        UNIT.format(start="+1h", end="+3h").replace("mode: l7", "mode: l7, encryption: false")
    )
    plain = _cli(tmp_path, "plan", str(unit), "--deployment", mdep, "--json")
    assert plain.returncode == 1, plain.stderr
    plan = json.loads(plain.stdout)
    assert plan["enclave"] == "moderate" and plan["template"].endswith("moderate.yaml")
    assert [p["field"] for p in plan["problems"]] == ["beamtime.stream.encryption"]

    # the maintenance calendar: a window over maintenance of what beamtime needs
    unit.write_text(UNIT.format(start="+1h", end="+3h"))
    book = ReservationBook(tmp_path / "res.sqlite")
    now = time.time()
    m = book.maintenance.add(now + 2 * 3600, now + 4 * 3600, "Lustre upgrade", ["storage"], "ops")
    clash = _cli(tmp_path, "plan", str(unit), "--deployment", dep)
    assert clash.returncode == 1
    assert f"beamtime.window: overlaps maintenance {m.id} 'Lustre upgrade'" in clash.stdout
    assert "takes down storage" in clash.stdout
    refused = _cli(tmp_path, "apply", str(unit), "--deployment", dep, "--approve")
    assert refused.returncode == 2 and "nothing was requested" in refused.stderr
    assert book.list("lcls01") == []


def test_a_denied_window_creates_nothing(tmp_path: Path) -> None:
    """Applied without --approve the window waits for an admin; denied, `open` skips the unit
    (and never calls the gateway, which here does not exist)."""
    dep = _deployment(tmp_path)
    unit = tmp_path / "bt.yaml"
    unit.write_text(UNIT.format(start="now", end="+1h"))
    applied = _cli(tmp_path, "apply", str(unit), "--deployment", dep, "--as", "alice")
    assert applied.returncode == 0, applied.stderr
    assert "window 1 requested (an admin approves it)" in applied.stdout
    nowhere = ("--gateway", "http://127.0.0.1:9/api/v1", "--dsn", "http://127.0.0.1:9")
    waiting = _cli(tmp_path, "open", *nowhere)
    assert waiting.returncode == 0 and "nothing due" in waiting.stdout  # not approved yet
    book = ReservationBook(tmp_path / "res.sqlite")
    [window] = book.list("lcls01")
    assert window.requested_by == "alice" and window.status == "requested"
    book.deny(window.id, "ops", "the beamline is down")
    skipped = _cli(tmp_path, "open", *nowhere)
    assert skipped.returncode == 0 and "skipped lcls01-w1: window 1 is denied" in skipped.stdout
    again = _cli(tmp_path, "open", *nowhere)
    assert "nothing due" in again.stdout
    listed = _cli(tmp_path, "list", "--json")
    assert [u["status"] for u in json.loads(listed.stdout)] == ["skipped"]


@pytest.fixture(params=["local", "slurm"])
def backend_kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.timeout(240)
async def test_apply_creates_channel_and_analysis_when_the_window_opens(
    backend_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    book = ReservationBook(tmp_path / "res.sqlite")
    projects = ProjectDirectory.from_dict(
        {
            "projects": {
                "lcls01": {"tiers": ["interactive", "normal", "batch"], "members": ["alice"]}
            }
        }
    )
    policy = TierPolicy(DEFAULT_TIERS, projects, book)
    if backend_kind == "slurm":
        cluster = request.getfixturevalue("slurm_cluster")
        backend = SlurmBackend(
            policy, slurm_conf=cluster.conf, log_dir=tmp_path / "out", poll_interval=0.2
        )
    else:
        backend = LocalBackend(tmp_path / "jobs.sqlite", nodes=2, policy=policy, poll_interval=0.05)
    keys = Keys()
    token = keys.token("alice", "lcls01", "stream.publish stream.read jobs")
    unit = tmp_path / "bt.yaml"
    unit.write_text(UNIT.format(start="+3s", end="+10m"))
    dep = _deployment(tmp_path)
    source = None
    try:
        async with running_gateway(keys, tmp_path / "gw", scheduler=backend) as s:
            s.gateway.reservations = book
            planned = await asyncio.to_thread(
                _cli, tmp_path, "plan", str(unit), "--deployment", dep
            )
            assert planned.returncode == 0 and "plan ok" in planned.stdout, planned.stdout
            t0 = time.time()
            applied = await asyncio.to_thread(
                _cli,
                tmp_path,
                *("apply", str(unit), "--deployment", dep, "--approve", "--wait"),
                *("--poll", "0.5", "--timeout", "60", "--gateway", s.url, "--dsn", s.dsn.url),
                BEAMHUB_TOKEN=token,
            )
            assert applied.returncode == 0, applied.stdout + applied.stderr
            assert "window 1 approved" in applied.stdout
            assert time.time() - t0 >= 2.5  # nothing was created before the window opened
            [window] = book.list("lcls01")
            assert window.status == "approved" and window.decided_by

            [data] = [
                json.loads(p.read_text()) for p in (tmp_path / "state/beamtime").glob("*.json")
            ]
            assert data["status"] == "created" and data["window_id"] == window.id
            made = data["created"]
            assert made["job_tier"] == "beamtime"
            assert made["channel"].startswith("ch-")

            code, channel, _ = await call(
                s.url, "GET", f"/projects/lcls01/channels/{made['channel']}", token
            )
            assert code == 200 and channel["stream"] == "detector", channel
            assert channel["params"]["mode"] == "l7"
            # the channel lives until the window ends, not longer
            assert channel["expires_at"] == pytest.approx(window.end, abs=15), channel

            source = await asyncio.to_thread(
                SourceRunner.from_dsn,
                SimulatedDetector((64, 64), seed=3, rate_hz=50.0),
                s.dsn.url,
                made["channel"],
                token,
            )
            await asyncio.to_thread(source.start)
            source.start_run()
            path = f"/projects/lcls01/jobs/{made['job']}"
            deadline = time.monotonic() + 90
            lines: list[dict] = []
            while time.monotonic() < deadline:
                code, job, _ = await call(s.url, "GET", path, token)
                assert code == 200 and job["state"] in ("pending", "running"), job
                if backend_kind == "slurm":  # SLURM's output is the job's file (kernels/slurm.py)
                    log = tmp_path / "out" / f"{made['job']}.out"
                    out = {"text": log.read_text() if log.exists() else ""}
                else:
                    code, out, _ = await call(s.url, "GET", path + "/output", token)
                lines = [
                    json.loads(x) for x in out.get("text", "").splitlines() if x.startswith("{")
                ]
                if lines and lines[-1]["frames"] > 0:
                    break
                await asyncio.sleep(1)
            assert lines and lines[-1]["frames"] > 0, (job, out)
            assert lines[-1]["workers"] == 2
            assert job["spec"]["tier"] == "beamtime" and job["spec"]["nodes"] == 1
            assert 0 < job["spec"]["walltime_s"] <= window.end - window.start
            await call(s.url, "DELETE", path, token)

            listed = await asyncio.to_thread(_cli, tmp_path, "list")
            assert "created" in listed.stdout and made["channel"] in listed.stdout
    finally:
        if source is not None:
            await asyncio.to_thread(source.stop)
        if isinstance(backend, LocalBackend):
            await backend.close(cancel_jobs=True)
        else:
            await backend.close()
            subprocess.run(["scancel", "--user=root"], env=backend.env, timeout=30, check=False)
