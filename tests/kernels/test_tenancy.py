"""Tenancy (decision 9): a member's job runs as her account, sandboxed, and cannot reach secrets.

The local backend's jobs run as ``bhtest-<user>`` in bubblewrap with the state dir hidden; the
SLURM backend's as the same account via ``sbatch --uid``, with credentials kept out of slurmctld.
Every check attacks from inside a real job, as a member would.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from beamhub.kernels.local import LocalBackend
from beamhub.kernels.scheduler import JobSpec, JobState
from beamhub.kernels.slurm import SlurmBackend
from tests.kernels.conftest import NODES, TEST_ACCOUNTS, sandbox_missing

PY = sys.executable
DONE = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED}

#: What a hostile job tries; prints one JSON line of what it managed.
ATTACK = textwrap.dedent("""
    import json, os, sys
    state, other = sys.argv[1], sys.argv[2]
    found = {"uid": os.getuid(), "home": os.environ.get("HOME"), "read": [], "wrote": [],
             "listed": [], "env": sorted(os.environ)}
    for name in ("signing-key.pem", "crypt-key", "runtime.json", "hub/jupyterhub.sqlite",
                 "tokens.sqlite", "scheduler/jobs.sqlite"):
        try:
            with open(os.path.join(state, name), "rb") as fh:
                fh.read(1)
            found["read"].append(name)
        except OSError:
            pass
    for path in (state, other):
        try:
            found["listed"].append([path, os.listdir(path)])
        except OSError:
            pass
    try:
        with open(os.path.join(other, "notes.txt"), "rb") as fh:
            found["read"].append("other:" + fh.read().decode())
    except OSError:
        pass
    for path in (os.path.join(state, "audit.jsonl"), os.path.join(other, "x"), "/etc/x"):
        try:
            with open(path, "a") as fh:
                fh.write("forged\\n")
            found["wrote"].append(path)
        except OSError:
            pass
    for path in (os.path.join(os.environ["HOME"], "mine.txt"), "/tmp/mine.txt"):
        with open(path, "w") as fh:
            fh.write("ok")
    found["own_files"] = True
    found["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    print(json.dumps(found), flush=True)
""")


def _secret_state(state: Path) -> None:
    """A state dir laid out as `beamhub up` keeps it, every secret 0600."""
    (state / "hub").mkdir(parents=True, exist_ok=True)
    for name in ("signing-key.pem", "crypt-key", "runtime.json", "hub/jupyterhub.sqlite"):
        path = state / name
        path.write_text("secret")
        path.chmod(0o600)
    (state / "tokens.sqlite").write_text("secret")
    (state / "audit.jsonl").write_text('{"seq": 1}\n')
    (state / "audit.jsonl").chmod(0o644)  # even a readable log: the job must not see it


def _last_json(text: str) -> dict:
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])


@pytest.fixture
def other_home(sandboxed_backend):
    """carol's home, with a file of hers."""
    carol = sandboxed_backend.accounts.ensure("carol")
    notes = Path(carol.home) / "notes.txt"
    notes.write_text("carol's notes")
    os.chown(notes, carol.uid, carol.gid)
    notes.chmod(0o644)  # readable by the world inside her 0700 home
    return Path(carol.home)


@pytest.mark.timeout(60)
async def test_a_members_job_runs_as_her_account_and_reaches_no_secret(
    sandboxed_backend, other_home
):
    backend = sandboxed_backend
    state = backend.db_path.parents[1]
    _secret_state(state)
    job_id = await backend.submit(
        JobSpec(
            name="attack",
            project="lcls01",
            user="alice",
            tier="interactive",
            argv=[PY, "-c", ATTACK, str(state), str(other_home)],
            env={"HOME": "/root", "LD_PRELOAD": ""},  # asking for root's home changes nothing
            mem_mb=400,
        )
    )
    info = await backend.wait(job_id, DONE, timeout=30)
    out = (backend.log_dir / f"{job_id}.out").read_text()
    assert info.state is JobState.COMPLETED, out
    found = _last_json(out)
    alice = pwd.getpwnam(TEST_ACCOUNTS.format(username="alice"))
    assert found["uid"] == alice.pw_uid != 0
    assert found["home"] == alice.pw_dir
    assert found["read"] == [] and found["wrote"] == [], found
    # the state dir is gone, or an empty tmpfs; carol's home cannot be listed
    assert all(entries == [] for _, entries in found["listed"]), found["listed"]
    assert str(other_home) not in [path for path, _ in found["listed"]]
    assert found["own_files"]
    assert (Path(alice.pw_dir) / "mine.txt").read_text() == "ok"
    assert found["pids"] == [1, 2, 3] or max(found["pids"]) < 10  # its own PID namespace
    assert not {"BEAMHUB_RUNTIME", "CONFIGPROXY_AUTH_TOKEN"} & set(found["env"])
    assert (state / "audit.jsonl").read_text() == '{"seq": 1}\n'


@pytest.mark.timeout(60)
async def test_an_output_path_into_the_state_dir_writes_nothing_there(sandboxed_backend):
    """A user-chosen output file is opened by the job as her account, never by root."""
    backend = sandboxed_backend
    state = backend.db_path.parents[1]
    _secret_state(state)
    before = (state / "audit.jsonl").read_text()
    job_id = await backend.submit(
        JobSpec(
            name="redirect",
            project="lcls01",
            user="alice",
            tier="interactive",
            argv=[PY, "-c", "print('forged')"],
            output=str(state / "audit.jsonl"),
        )
    )
    info = await backend.wait(job_id, DONE, timeout=30)
    assert info.state is JobState.FAILED
    assert (state / "audit.jsonl").read_text() == before
    assert "audit.jsonl" in (backend.log_dir / f"{job_id}.out").read_text()


@pytest.mark.timeout(90)
async def test_a_sandboxed_job_is_reattached_after_a_restart_and_cancelled(
    sandboxed_backend, tmp_path, policy
):
    backend = sandboxed_backend
    job_id = await backend.submit(
        JobSpec(
            name="long",
            project="lcls01",
            user="alice",
            tier="batch",
            argv=[PY, "-c", "import time; print('up', flush=True); time.sleep(120)"],
        )
    )
    await backend.wait(job_id, {JobState.RUNNING}, timeout=20)
    await backend.close()  # the hub stops; the job keeps running
    again = LocalBackend(
        backend.db_path,
        nodes=NODES,
        policy=policy,
        poll_interval=0.05,
        run_as="account",
        account_template=TEST_ACCOUNTS,
        hide=backend._hide,
    )
    try:
        assert (await again.status([job_id]))[job_id].state is JobState.RUNNING
        await again.cancel(job_id)
        info = await again.wait(job_id, DONE, timeout=15)
        assert info.state is JobState.CANCELLED
        uid = pwd.getpwnam(TEST_ACCOUNTS.format(username="alice")).pw_uid
        deadline = time.monotonic() + 10
        while _processes_of(uid):
            assert time.monotonic() < deadline, _processes_of(uid)
            await asyncio.sleep(0.1)
    finally:
        await again.close(cancel_jobs=True)


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.timeout(60)
async def test_a_job_over_its_nodes_memory_is_killed_where_cgroups_are_writable(tmp_path, policy):
    why = sandbox_missing()
    if why:
        pytest.skip(why)
    backend = LocalBackend(
        tmp_path / "s" / "jobs.sqlite",
        nodes=1,
        mem_mb_per_node=200,
        policy=policy,
        poll_interval=0.05,
        run_as="account",
        account_template=TEST_ACCOUNTS,
        hide=[str(tmp_path / "s")],
    )
    try:
        if "memory" not in backend.limits.enforced:
            pytest.skip(f"memory limits not enforced here: {backend.limits.summary}")
        hog = "b = bytearray(400 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); print('held')"
        spec = JobSpec(name="hog", project="lcls01", user="alice", tier="batch", argv=[])
        spec.argv, spec.mem_mb = [PY, "-c", hog], 150
        job_id = await backend.submit(spec)
        info = await backend.wait(job_id, DONE, timeout=30)
        out = (backend.log_dir / f"{job_id}.out").read_text()
        assert info.state is JobState.FAILED and "held" not in out, (info, out)
    finally:
        await backend.close(cancel_jobs=True)


# -- SLURM: sbatch --uid, credentials kept out of slurmctld ----------------------------------------


@pytest.mark.slurm
@pytest.mark.timeout(90)
async def test_a_slurm_job_runs_as_her_account_and_its_token_never_reaches_slurmctld(
    slurm_cluster, policy
):
    why = sandbox_missing()
    if why:
        pytest.skip(why)
    backend = SlurmBackend(
        policy,
        slurm_conf=slurm_cluster.conf,
        poll_interval=0.2,
        run_as="account",
        account_template=TEST_ACCOUNTS,
    )
    token = "bh-secret-" + os.urandom(8).hex()
    account = backend.accounts.ensure("alice")
    # a fresh test cluster numbers its jobs from 1 again: an earlier run's output of the same
    # job id (appended to, never truncated) must not pass for this job's; nor an earlier run's
    # secrets file (a job killed before it started leaves its own behind)
    for stale in [
        *(Path(account.home) / ".beamhub" / "slurm").glob("*.out"),
        *(Path(account.home) / ".beamhub" / "secrets").glob("*.json"),
    ]:
        stale.unlink()
    probe = (
        "import os, json; print(json.dumps({'uid': os.getuid(), "
        "'token': os.environ.get('BEAMHUB_TOKEN'), "
        "'file': os.environ.get('BEAMHUB_SECRETS_FILE')}), flush=True); "
        "import time; time.sleep(30)"
    )
    job_id = await backend.submit(
        JobSpec(
            name="probe",
            project="lcls01",
            user="alice",
            tier="interactive",
            argv=[PY, "-c", probe],
            env={"BEAMHUB_TOKEN": token, "JUPYTERHUB_API_TOKEN": token, "PATH": "/usr/bin:/bin"},
            mem_mb=200,
        )
    )
    try:
        await backend.wait(job_id, {JobState.RUNNING}, timeout=30)
        out = Path(account.home) / ".beamhub" / "slurm" / f"{job_id}.out"
        deadline = time.monotonic() + 20
        while not (out.exists() and "{" in out.read_text()):
            assert time.monotonic() < deadline, "the job printed nothing"
            await asyncio.sleep(0.2)
        seen = _last_json(out.read_text())
        assert seen["uid"] == account.uid != 0
        assert seen["token"] == token and seen["file"] is None  # loaded, then gone
        assert not list((Path(account.home) / ".beamhub" / "secrets").iterdir())
        env = {**os.environ, "SLURM_CONF": str(slurm_cluster.conf)}
        shown = subprocess.run(
            ["scontrol", "show", "job", "-d", job_id], env=env, capture_output=True, text=True
        ).stdout
        assert f"UserId={account.name}({account.uid})" in shown
        script = subprocess.run(
            ["scontrol", "write", "batch_script", job_id, "-"],
            env=env,
            capture_output=True,
            text=True,
        ).stdout
        assert "BEAMHUB_SECRETS_FILE" in script
        assert token not in shown and token not in script
        saved = subprocess.run(
            ["grep", "-rl", token, str(slurm_cluster.state)], capture_output=True, text=True
        )
        assert saved.stdout == "", f"the token is in slurmctld's state: {saved.stdout}"
    finally:
        await backend.cancel(job_id)
        await backend.wait(job_id, DONE, timeout=20)
        await backend.close()


# -- what isolation costs (figures for BENCHMARKS.md) ----------------------------------------------


async def _first_output(backend: LocalBackend, out_dir: Path) -> float:
    """Seconds from submit to the job's first line of output."""
    out = out_dir / f"{uuid.uuid4().hex}.out"
    t0 = time.monotonic()
    job_id = await backend.submit(
        JobSpec(
            name="hello",
            project="lcls01",
            user="alice",
            tier="interactive",
            argv=[PY, "-c", "print('up', flush=True)"],
            output=str(out),
        )
    )
    while not (out.exists() and "up" in out.read_text()):
        assert time.monotonic() - t0 < 20, (await backend.status([job_id]))[job_id]
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - t0
    await backend.wait(job_id, DONE, timeout=20)
    return elapsed


def _spawn_time(hub, user: str) -> float:
    t0 = time.monotonic()
    code, _ = hub.api("POST", f"/users/{user}/server", {})
    assert code in (201, 202), code
    events = hub.progress(user, timeout=90)
    assert events[-1].get("ready"), events
    elapsed = time.monotonic() - t0
    assert hub.api("DELETE", f"/users/{user}/server")[0] in (202, 204)
    deadline = time.monotonic() + 30
    while hub.user_model(user)["servers"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return elapsed


@pytest.mark.timeout(300)
async def test_isolation_costs_are_measured_in_one_run(tmp_path, policy):
    """Job start (submit → first output line) and server spawn (request → API answers through
    the proxy) with the sandbox off and on, interleaved in one run; prints JSON."""
    why = sandbox_missing()
    if why:
        pytest.skip(why)
    from statistics import median

    from beamhub.bench.hubproc import Hub

    runs = 7
    plain = LocalBackend(tmp_path / "plain" / "j.sqlite", nodes=NODES, policy=policy)
    boxed = LocalBackend(
        tmp_path / "boxed" / "j.sqlite",
        nodes=NODES,
        policy=policy,
        run_as="account",
        account_template=TEST_ACCOUNTS,
        hide=[str(tmp_path / "boxed")],
    )
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    alice = boxed.accounts.ensure("alice")
    os.chown(out_dir, alice.uid, alice.gid)
    jobs: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for _ in range(runs):
            jobs["off"].append(await _first_output(plain, out_dir))
            jobs["on"].append(await _first_output(boxed, out_dir))
    finally:
        await plain.close(cancel_jobs=True)
        await boxed.close(cancel_jobs=True)

    hubs, spawns = {}, {"off": [], "on": []}
    for mode, run_as in (("off", "self"), ("on", "account")):
        workdir = tmp_path / f"hub-{mode}"
        config = f"""
c.ReservedNodeSpawner.state_dir = {str(workdir / "sched")!r}
c.ReservedNodeSpawner.project = "lcls01"
c.ReservedNodeSpawner.mem_mb = 256
c.ReservedNodeSpawner.run_as = {run_as!r}
c.ReservedNodeSpawner.account_template = {TEST_ACCOUNTS!r}
"""
        hubs[mode] = Hub(workdir, config, ["alice"])
    try:
        for hub in hubs.values():
            await asyncio.to_thread(hub.start)
        for _ in range(3):
            for mode, hub in hubs.items():
                spawns[mode].append(await asyncio.to_thread(_spawn_time, hub, "alice"))
    finally:
        for mode, hub in hubs.items():
            await asyncio.to_thread(hub.stop)
            await asyncio.to_thread(hub.cleanup_jobs, tmp_path / f"hub-{mode}" / "sched")

    def row(samples: dict[str, list[float]]) -> dict:
        off, on = median(samples["off"]), median(samples["on"])
        return {"off_s": round(off, 3), "on_s": round(on, 3), "ratio": round(on / off, 2)}

    figures = {
        "runs": {"job": runs, "spawn": 3},
        "job_start": row(jobs),
        "spawn": row(spawns),
        "limits": boxed.limits.summary if boxed.limits else "",
    }
    print(json.dumps(figures))
    assert figures["job_start"]["on_s"] < 5 and figures["spawn"]["on_s"] < 60


@pytest.mark.timeout(60)
async def test_code_under_tmp_stays_runnable_inside_the_private_tmp(sandboxed_backend, monkeypatch):
    """A checkout (and its venv) under /tmp: the job's private /tmp must not hide it."""
    from beamhub.kernels import sandbox

    code = Path(tempfile.mkdtemp(prefix="beamhub-code-", dir="/tmp"))
    try:
        code.chmod(0o755)
        script = code / "hello.py"
        script.write_text("print('hello from', __file__, flush=True)\n")
        script.chmod(0o644)
        real = sandbox.code_paths()
        monkeypatch.setattr(sandbox, "code_paths", lambda: [*real, str(code)])
        job_id = await sandboxed_backend.submit(
            JobSpec(
                name="code-in-tmp",
                project="lcls01",
                user="alice",
                tier="interactive",
                argv=[PY, str(script)],
            )
        )
        info = await sandboxed_backend.wait(job_id, DONE, timeout=30)
        out = (sandboxed_backend.log_dir / f"{job_id}.out").read_text()
        assert info.state is JobState.COMPLETED, out
        assert f"hello from {script}" in out
    finally:
        shutil.rmtree(code, ignore_errors=True)
