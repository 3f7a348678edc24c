"""A real `beamhub up` for the fault and soak benchmarks, and what they attach to it.

:class:`UpStack` runs `beamhub up` as a subprocess on a temporary state dir (its own session, so
a Ctrl-C of the benchmark reaches it only through :meth:`UpStack.stop`), logs users in through
the real OpenID provider without a browser and spawns their servers. :class:`SeqAnalysis` runs
the Dask :class:`~beamhub.streaming.analysis_dask.AnalysisSession` on the detector channel's work
stream and keeps every analysed frame's sequence number, so that lost frames are counted from
sequence holes across all workers. :class:`GatewayTraffic` and :class:`DashboardViewer` are the
background load; :func:`stack_processes` finds every process of the stack for sampling.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "DashboardViewer",
    "GatewayTraffic",
    "SeqAnalysis",
    "UpStack",
    "answers",
    "process_env",
    "say",
    "stack_processes",
    "wait_for",
]

BEAMHUB = str(Path(sys.executable).with_name("beamhub"))
PROJECT = "p-1001"


def dev_yaml(rate: float, shape: tuple[int, ...], revocation_poll: float = 1.0) -> str:
    """beamhub.yaml of a benchmark's stack: dev enclave, any port, the detector at rate/shape."""
    return (
        "enclave: dev\n"
        "hub: {port: 0}\n"
        f"tokens: {{ttl: 3600, revocation_poll: {revocation_poll:g}}}\n"
        f"detector: {{rate_hz: {rate:g}, shape: {list(shape)}, print_every_s: 0}}\n"
    )


def say(line: str) -> None:
    """A progress line on stderr (stdout is the JSON document)."""
    print(line, file=sys.stderr, flush=True)


def wait_for(check: Callable[[], bool], timeout: float, period: float = 0.1) -> float | None:
    """Seconds until ``check()`` holds, or None after ``timeout``."""
    t0 = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - t0
        except Exception:  # a probe that raises is a probe that says "not yet"
            pass
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(period)


def answers(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(url, headers=headers, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def stack_processes(state: Path) -> dict[int, str]:
    """pid -> a name for every live process whose $BEAMHUB_HOME is ``state`` (servers included)."""
    import psutil

    status = {}
    with contextlib.suppress(OSError, ValueError):
        services = json.loads((state / "status.json").read_text())["services"]
        status = {s["pid"]: name for name, s in services.items() if s.get("pid")}
    found: dict[int, str] = {}
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        pid = proc.info["pid"]
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            env = process_env(pid)
        except OSError:
            continue
        if env.get("BEAMHUB_HOME") != str(state):
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        if pid in status:
            found[pid] = status[pid]
        elif "JUPYTERHUB_USER" in env and "singleuser" in cmd:
            found[pid] = f"server-{env['JUPYTERHUB_USER']}"
        elif "_jobwrap" in cmd:
            found[pid] = f"jobwrap-{env.get('JUPYTERHUB_USER', '?')}"
        elif "beamhub up" in cmd or cmd.endswith(" up") or " up " in cmd:
            found[pid] = "beamhub-up"
        else:
            found[pid] = f"other-{pid}"
    return found


class UpStack:
    """`beamhub up` on a temporary state dir; URLs, admin token, login and spawn helpers."""

    def __init__(self, yaml_text: str, keep: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="beamhub-bench-"))
        self.dir.chmod(0o711)  # as root the services run as beamhub-* and must pass through
        self.state = self.dir / "state"
        self.config = self.dir / "beamhub.yaml"
        self.config.write_text(f"state_dir: {self.state}\n{yaml_text}")
        self.out_path = self.dir / "up.out"
        self.keep = keep
        self.proc: subprocess.Popen | None = None
        self.urls: dict[str, str] = {}
        self.runtime: dict[str, Any] = {}

    # --- process ----------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> UpStack:
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                [BEAMHUB, "up", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C reaches it only through stop()
                env={**os.environ, "BEAMHUB_HOME": str(self.state)},
            )
        ok = wait_for(
            lambda: "beamhub up: running" in self.output() or self.proc.poll() is not None,
            timeout,
            0.2,
        )
        if ok is None or self.proc.poll() is not None:
            tail = self.output()[-3000:]
            self.stop()
            raise RuntimeError(f"beamhub up did not start:\n{tail}")
        self.urls = json.loads((self.state / "runtime-urls.json").read_text())
        self.runtime = json.loads((self.state / "hub" / "runtime.json").read_text())
        return self

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    @property
    def public(self) -> str:
        return self.urls["hub"].removesuffix("/hub/")

    @property
    def hub(self) -> str:
        return self.urls["hub"]

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"token {self.runtime['admin_api_token']}"}

    def status(self) -> dict[str, dict[str, Any]]:
        return json.loads((self.state / "status.json").read_text())["services"]

    def stop(self) -> None:
        """Stop user servers through the hub, then `beamhub up`; kill whatever it left."""
        import psutil
        import requests

        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(requests.RequestException, ValueError, KeyError):
                users = requests.get(f"{self.hub}api/users", headers=self.admin, timeout=10)
                for user in users.json():
                    for name in user.get("servers") or {}:
                        requests.delete(
                            f"{self.hub}api/users/{user['name']}/servers/{name}",
                            headers=self.admin,
                            timeout=30,
                        )
                wait_for(lambda: not self._servers_running(), 30, 0.3)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.state.exists():
            for pid in stack_processes(self.state):  # ours: they carry our state dir
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()
        if not self.keep:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)

    def _servers_running(self) -> bool:
        import requests

        users = requests.get(f"{self.hub}api/users", headers=self.admin, timeout=10).json()
        return any(u.get("servers") for u in users)

    # --- users ------------------------------------------------------------------------------
    def login(self, user: str, password: str) -> Any:
        """Browserless OIDC (:func:`beamhub.hub.login_client.sign_in`); the session."""
        from beamhub.hub.login_client import sign_in

        s, r = sign_in(self.hub, user, password)
        if r.status_code != 200:
            raise RuntimeError(f"login of {user} failed: HTTP {r.status_code} at {r.url}")
        return s

    def user_model(self, user: str) -> dict[str, Any]:
        import requests

        r = requests.get(f"{self.hub}api/users/{user}", headers=self.admin, timeout=10)
        r.raise_for_status()
        return r.json()

    def spawn(self, session: Any, user: str, timeout: float = 120.0) -> None:
        """Start the user's server as she would (the hub's spawn page); wait until ready."""
        from beamhub.hub.login_client import request_server

        r = request_server(self.hub, session, timeout=60)  # the options form's defaults
        if r.status_code != 200:
            raise RuntimeError(f"spawn of {user}'s server: HTTP {r.status_code} at {r.url}")
        if (
            wait_for(lambda: (self.user_model(user)["servers"].get("") or {}).get("ready"), timeout)
            is None
        ):
            raise RuntimeError(f"{user}'s server was not ready within {timeout:.0f} s")

    def user_api_token(self, user: str) -> str:
        import requests

        r = requests.post(
            f"{self.hub}api/users/{user}/tokens",
            headers=self.admin,
            json={"expires_in": 86400, "note": "beamhub bench"},
            timeout=10,
        )
        r.raise_for_status()
        return r.json()["token"]

    def project_token(self, api_token: str, scopes: list[str], ttl: int = 86400) -> str:
        import requests

        r = requests.post(
            self.urls["tokens"] + "api/tokens",
            headers={"Authorization": f"token {api_token}"},
            json={"project": PROJECT, "scopes": scopes, "ttl": ttl},
            timeout=10,
        )
        r.raise_for_status()
        return r.json()["token"]

    def server_pid(self, user: str) -> int | None:
        for pid, name in stack_processes(self.state).items():
            if name == f"server-{user}":
                return pid
        return None

    def detector_channel(self) -> str:
        return json.loads((self.state / "detector" / "detector.json").read_text())["channel"]

    def channel_info(self, token: str) -> dict[str, Any]:
        import requests

        r = requests.get(
            f"{self.urls['dsn']}/api/channels/{self.detector_channel()}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        r.raise_for_status()
        return r.json()


def secure_consumer(dsn_url: str, channel: str, token: str, **kwargs: Any) -> Any:
    """A work consumer with its own CURVE key, registered on the channel first (every channel
    has a credential). Runs inside a Dask worker task, so it is a module-level function."""
    import uuid

    import requests
    import zmq

    from beamhub.streaming.consumer import StreamConsumer, lookup_channel

    consumer_id = f"bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    info = lookup_channel(dsn_url, channel, token)
    endpoints = info.get("endpoints") or {}
    if not endpoints.get("server_key"):  # a DSN without channel credentials
        return StreamConsumer(
            endpoints["work"], consumer_id=consumer_id, report=endpoints.get("report"), **kwargs
        )
    public, secret = zmq.curve_keypair()
    r = requests.post(
        f"{dsn_url}/api/channels/{channel}/credentials",
        headers={"Authorization": f"Bearer {token}"},
        json={"face": "consumer", "public_key": public.decode(), "consumer_id": consumer_id},
        timeout=10,
    )
    if r.status_code != 201:
        raise RuntimeError(f"the DSN refused the consumer key: {r.status_code} {r.text[:300]}")
    return StreamConsumer(
        endpoints["work"],
        consumer_id=consumer_id,
        report=endpoints.get("report"),
        curve_server_key=endpoints["server_key"],
        curve_keypair=(public, secret),
        **kwargs,
    )


class SeqAnalysis:
    """The Dask analysis on the work stream; every analysed frame's seq, per producer epoch.

    A restarted detector counts ``seq`` from 0 again: :meth:`new_epoch` (called when the
    benchmark kills it) makes the next low sequence numbers a new epoch, while late results of
    the old one still land in the old.
    """

    def __init__(self, dsn_url: str, channel: str, token: str, workers: int = 2) -> None:
        import functools

        import dask
        from distributed import Client, LocalCluster

        from beamhub.streaming.analysis_dask import STREAMING_WORKER_ENV, AnalysisSession

        dask.config.set({"distributed.nanny.pre-spawn-environ": STREAMING_WORKER_ENV})
        self.cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=50,
        )
        self.client = Client(self.cluster)
        factory = functools.partial(secure_consumer, dsn_url, channel, token)
        self.session = AnalysisSession(self.client, factory, workers=workers)
        self.epochs: list[set[int]] = [set()]
        self._expect_restart = False
        self.frames = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._collect, name="bench-analysis", daemon=True)

    def start(self, timeout: float = 90.0) -> SeqAnalysis:
        self.session.wait_ready(timeout)
        self._thread.start()
        return self

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                results = self.session.poll(timeout=0.2)
            except Exception as exc:  # a failed worker task: keep the reason, keep collecting
                self.error = f"{type(exc).__name__}: {exc}"
                time.sleep(0.2)
                continue
            self._add([r.seq for r in results])

    def _add(self, seqs: list[int]) -> None:
        with self.lock:
            for seq in seqs:
                self.frames += 1
                cur = self.epochs[-1]
                top = max(cur) if cur else -1
                if self._expect_restart and cur and seq < top - 1000:
                    self.epochs.append({seq})
                    self._expect_restart = False
                    continue
                if len(self.epochs) > 1 and cur and seq > max(cur) + 1000:
                    self.epochs[-2].add(seq)  # a late result of the epoch before
                    continue
                cur.add(seq)

    def new_epoch(self) -> None:
        with self.lock:
            self._expect_restart = True

    def head(self) -> tuple[int, int]:
        """(epoch index, highest seq analysed in it)."""
        with self.lock:
            cur = self.epochs[-1]
            return len(self.epochs) - 1, (max(cur) if cur else -1)

    def missing(self, epoch: int, after: int, upto: int | None) -> int:
        """Frames of ``epoch`` with ``after < seq <= upto`` that no worker analysed."""
        with self.lock:
            seen = self.epochs[epoch]
            if not seen:
                return 0
            top = max(seen) if upto is None else min(upto, max(seen))
            low = after + 1
            return sum(1 for s in range(low, top + 1) if s not in seen)

    def worker_pids(self) -> dict[str, int]:
        return self.client.run(os.getpid)

    def task_workers(self) -> list[str]:
        """The worker address of each analysis task, by task index."""
        who = self.client.who_has(self.session.futures)
        return [next(iter(who.get(f.key, ())), "") for f in self.session.futures]

    def n_workers(self) -> int:
        return len(self.client.scheduler_info()["workers"])

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        summaries: list[dict[str, Any]] = []
        try:
            summaries = self.session.stop(timeout=20)
        except Exception as exc:  # a task stuck on a dead worker does not stop: say so
            summaries = [{"error": f"{type(exc).__name__}: {exc}"}]
        with contextlib.suppress(Exception):
            self._add([r.seq for r in self.session.poll(timeout=0.5)])
        with contextlib.suppress(Exception):
            self.client.close(timeout=10)
        with contextlib.suppress(Exception):
            self.cluster.close(timeout=20)
        return summaries


class GatewayTraffic:
    """Requests to the gateway at ``rate`` per second with one token; counts the acknowledged.

    An answer from the gateway itself (200, or a 403/429 refusal, each audited before it is sent)
    is an acknowledged audit record; a 502/503 from the proxy while the gateway is down is not.
    """

    ACKED = (200, 403, 429)

    def __init__(self, url: str, token: str, rate: float = 20.0) -> None:
        self.url, self.token, self.period = url, token, 1.0 / rate
        self.acked = 0
        self.other: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-gateway", daemon=True)

    def start(self) -> GatewayTraffic:
        self._thread.start()
        return self

    def _run(self) -> None:
        import requests

        s = requests.Session()
        headers = {"Authorization": f"Bearer {self.token}"}
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                code = s.get(self.url, headers=headers, timeout=5).status_code
                if code in self.ACKED:
                    self.acked += 1
                else:
                    self.other[str(code)] = self.other.get(str(code), 0) + 1
            except requests.RequestException as exc:
                key = type(exc).__name__
                self.other[key] = self.other.get(key, 0) + 1
                s = requests.Session()
            self._stop.wait(max(0.0, self.period - (time.monotonic() - t0)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def audit_records(path: Path, jti: str) -> int:
    """Records of ``jti`` in the audit log (complete lines only)."""
    n = 0
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        for line in f:
            if line.endswith(b"\n") and jti.encode() in line:
                n += 1
    return n


def audit_verify(path: Path) -> dict[str, Any]:
    """`beamhub audit verify --json` on ``path``: its JSON and exit status."""
    out = subprocess.run(
        [BEAMHUB, "audit", "verify", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        result = json.loads(out.stdout)
    except ValueError:
        result = {"ok": False, "reason": (out.stdout + out.stderr)[-300:]}
    result["exit"] = out.returncode
    return result


class DashboardViewer:
    """A logged-in viewer polling the dashboard's data API at ``hz``; counts answers."""

    def __init__(self, session: Any, url: str, hz: float = 2.0) -> None:
        self.session, self.url, self.period = session, url, 1.0 / hz
        self.ok = 0
        self.failed = 0
        self.frames_analysed: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-viewer", daemon=True)

    def start(self) -> DashboardViewer:
        self._thread.start()
        return self

    def _run(self) -> None:
        import requests

        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = self.session.get(self.url, params={"viewer": "bench"}, timeout=5)
                if r.status_code == 200:
                    self.ok += 1
                else:
                    self.failed += 1
            except requests.RequestException:
                self.failed += 1
            self._stop.wait(max(0.0, self.period - (time.monotonic() - t0)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
