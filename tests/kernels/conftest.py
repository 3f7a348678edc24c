"""A real SLURM for the slurm tests: munged, slurmctld and 4 `slurmd -N nX` on this host."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from beamhub.kernels.local import LocalBackend
from beamhub.kernels.projects import ProjectDirectory
from beamhub.kernels.reservations import ReservationBook
from beamhub.kernels.slurm import SlurmBackend
from beamhub.kernels.tier_policy import TierPolicy
from beamhub.kernels.tiers import DEFAULT_TIERS

REPO = Path(__file__).resolve().parents[2]
START = REPO / "scripts" / "slurm" / "start.sh"
STOP = REPO / "scripts" / "slurm" / "stop.sh"
NODES = 4


@dataclass
class SlurmCluster:
    conf: Path
    state: Path
    nodes: int
    cold_start_s: float


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # slurmd/slurmctld bind the wildcard address
        except OSError:
            return False
    return True


def _port_block(count: int) -> int:
    """The first of ``count`` consecutive free ports (SLURM wants its ports before it starts)."""
    for _ in range(200):
        first = random.randrange(20000, 32000 - count)
        if all(_free(first + i) for i in range(count)):
            return first
    raise RuntimeError("no block of free ports found")


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the cluster once per test session (scripts/slurm/start.sh), stop it at the end."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"SLURM binaries not installed ({', '.join(missing)}); `./dev setup` installs "
            "slurmctld slurmd slurm-client munge from scripts/apt-packages.txt"
        )
    if os.geteuid() != 0:
        pytest.skip("starting munged and the SLURM daemons needs root")
    state = Path(tempfile.mkdtemp(prefix="bh-slurm-", dir="/tmp"))  # short: unix socket paths
    first = _port_block(NODES + 1)
    env = {
        **os.environ,
        "SLURM_STATE_DIR": str(state),
        "SLURMCTLD_PORT": str(first),
        "SLURMD_PORT": str(first + 1),
        "SLURM_NODES": str(NODES),
        "SLURM_CRED_EXPIRE": "5",
    }
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(START)], env=env, capture_output=True, text=True, timeout=90)
    cold = time.monotonic() - t0
    if proc.returncode != 0:
        logs = "".join(p.read_text()[-2000:] for p in sorted((state / "log").glob("*.log")))
        shutil.rmtree(state, ignore_errors=True)
        pytest.fail(f"scripts/slurm/start.sh failed ({proc.returncode}): {proc.stderr}\n{logs}")
    conf = state / "slurm.conf"
    try:
        yield SlurmCluster(conf=conf, state=state, nodes=NODES, cold_start_s=cold)
    finally:
        subprocess.run(["bash", str(STOP)], env=env, capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):
    """The session cluster's SLURM_CONF in os.environ, for code that reads it (sbatch called by
    dask-jobqueue, the spawner's slurm backend). Request this instead of skipping on $SLURM_CONF."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    return slurm_cluster


@pytest.fixture
def policy(tmp_path):
    """Project lcls01 (alice) holds interactive/normal/batch and an approved beamtime window now;
    chem02 (carol) holds batch only."""
    projects = ProjectDirectory.from_dict(
        {
            "projects": {
                "lcls01": {"tiers": ["interactive", "normal", "batch"], "members": ["alice"]},
                "chem02": {"tiers": ["batch"], "members": ["carol"]},
            }
        }
    )
    book = ReservationBook(tmp_path / "res.sqlite", admins={"root"})
    now = time.time()
    book.approve(book.request("lcls01", now - 60, now + 3600, "beamtime", "SFX", "alice"), "root")
    return TierPolicy(DEFAULT_TIERS, projects, book)


@pytest.fixture
async def local_backend(tmp_path, policy):
    """A LocalBackend of NODES virtual nodes with ``policy``; its jobs are killed afterwards."""
    backend = LocalBackend(tmp_path / "jobs.sqlite", nodes=NODES, policy=policy, poll_interval=0.05)
    yield backend
    await backend.close(cancel_jobs=True)


#: Unix accounts the tenancy tests create (kept apart from `beamhub up`'s bh-* accounts)
TEST_ACCOUNTS = "bhtest-{username}"


def sandbox_missing() -> str:
    """Why the sandboxed local backend cannot run here ("" when it can)."""
    if os.geteuid() != 0:
        return "running jobs as other accounts needs root"
    missing = [b for b in ("bwrap", "setpriv", "useradd") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (`./dev setup`: scripts/apt-packages.txt)"
    return ""


@pytest.fixture
async def sandboxed_backend(tmp_path, policy):
    """A LocalBackend that runs each job as bhtest-<user> in bubblewrap, hiding tmp_path/state."""
    why = sandbox_missing()
    if why:
        pytest.skip(why)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    backend = LocalBackend(
        state / "scheduler" / "jobs.sqlite",
        nodes=NODES,
        policy=policy,
        poll_interval=0.05,
        run_as="account",
        account_template=TEST_ACCOUNTS,
        hide=[str(state)],
    )
    yield backend
    await backend.close(cancel_jobs=True)


def user_dir(backend, user: str, path: Path) -> Path:
    """``path`` made a folder of ``user``'s account when the backend runs jobs as accounts
    (a sandboxed job writes only there, in its home and in its private /tmp)."""
    path.mkdir(parents=True, exist_ok=True)
    accounts = getattr(backend, "accounts", None)
    if accounts is not None and accounts.mode == "account":
        account = accounts.ensure(user)
        os.chown(path, account.uid, account.gid)
    return path


@pytest.fixture
async def slurm_backend(slurm_cluster, policy, tmp_path):
    """A SlurmBackend on the session cluster with ``policy``, job output in tmp_path/out; every
    job is cancelled afterwards and the nodes are idle again before the next test."""
    backend = SlurmBackend(
        policy, slurm_conf=slurm_cluster.conf, log_dir=tmp_path / "out", poll_interval=0.2
    )
    yield backend
    await backend.close()
    subprocess.run(["scancel", "--user=root"], env=backend.env, timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["squeue", "-h", "-t", "PD,R,CG", "-o", "%i"],
            env=backend.env,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        if not out.strip():
            break
        await asyncio.sleep(0.2)
