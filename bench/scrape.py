"""`beamhub bench scrape`: what a 1 s Prometheus scrape costs the DSN's throughput, one run.

A real DSN (``beamhub dsn``, its own process), one channel (L7 by default), a producer process
sending frames as fast as it can through the channel to a work consumer in this process. Each
repeat transfers the same frames twice, in alternating order: once with nothing scraping
(``none``, the baseline) and once while Debian's Prometheus scrapes the DSN's ``/metrics`` every
second (``scrape_1s``). Figures are medians of the repeats: messages/s and GB/s (first to last
frame received), the DSN process's CPU seconds per GB, and for the scraped transfers how many
scrapes fell into them and how long one took (Prometheus' own ``scrape_duration_seconds``). Last,
the DSN's own CPU time per ``/metrics`` request (100 requests on the idle channel): the cost of a
scrape that the throughput's noise may hide.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["main"]

HEADER = (
    b'{"v":1,"seq":%d,"t_ns":%d,"stream":"bench","dtype":"<u2","shape":[%d],'
    b'"run":0,"rev":0,"meta":{}}'
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: Any = None, token: str = "", timeout: float = 10) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.load(resp)


def _wait(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
        except OSError:
            got = None
        if got:
            return got
        time.sleep(0.1)
    raise RuntimeError(f"bench scrape: {what} not within {timeout} s")


def _register(dsn: str, cid: str, token: str, face: str) -> dict[str, Any]:
    import zmq

    public, secret = zmq.curve_keypair()
    body = {"face": face, "public_key": public.decode()}
    if face == "consumer":
        body["consumer_id"] = "bench-work"
    answer = _http(f"{dsn}/api/channels/{cid}/credentials", body, token)
    return {"server": answer["server_key"], "public": public.decode(), "secret": secret.decode()}


def _secure(sock: Any, cred: dict[str, Any]) -> None:
    sock.curve_serverkey = cred["server"].encode()
    sock.curve_publickey = cred["public"].encode()
    sock.curve_secretkey = cred["secret"].encode()


def _producer(endpoint: str, cred: dict[str, Any], count: int, frame_bytes: int) -> None:
    """Producer process: ``count`` frames at full speed, headers from a byte template."""
    import numpy as np
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    _secure(sock, cred)
    sock.sndhwm = 256
    sock.connect(endpoint)
    payload = memoryview(np.zeros(frame_bytes // 2, dtype="<u2")).cast("B")
    shape = frame_bytes // 2
    for seq in range(count):
        sock.send(HEADER % (seq, time.time_ns(), shape), zmq.SNDMORE)
        sock.send(payload, copy=False)
    sock.close(linger=-1)
    ctx.term()


class Prometheus:
    """Debian's prometheus scraping the DSN's /metrics every second, in a temporary folder."""

    def __init__(self, dsn_hostport: str, folder: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
            "scrape_configs:\n"
            f"  - {{job_name: dsn, static_configs: [{{targets: ['{dsn_hostport}']}}]}}\n"
        )
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait("prometheus ready", lambda: self.query("up")[0] == 1.0)

    def query(self, expr: str) -> list[float]:
        from urllib.parse import quote

        data = _http(f"{self.url}/api/v1/query?query={quote(expr)}")["data"]["result"]
        return [float(r["value"][1]) for r in data] or [0.0]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def _transfer(
    dsn_pid: int, endpoints: dict[str, str], creds: dict[str, Any], count: int, frame_bytes: int
) -> dict[str, float]:
    import psutil
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    _secure(pull, creds["consumer"])
    pull.rcvhwm = 256
    pull.connect(endpoints["work"])
    time.sleep(0.3)  # the DSN sees its consumer before the producer starts
    hop = psutil.Process(dsn_pid)
    cpu0 = sum(hop.cpu_times()[:2])
    proc = mp.get_context("spawn").Process(
        target=_producer, args=(endpoints["producer"], creds["producer"], count, frame_bytes)
    )
    proc.start()
    got, first, last = 0, 0.0, 0.0
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    while got < count:
        if not poller.poll(10_000):
            break  # lost frames: counted as missing below
        pull.recv_multipart(copy=False)
        last = time.perf_counter()
        if got == 0:
            first = last
        got += 1
    cpu = sum(hop.cpu_times()[:2]) - cpu0
    proc.join(30)
    pull.close(linger=0)
    ctx.term()
    seconds = max(last - first, 1e-9)
    gigabytes = (got - 1) * frame_bytes / 1e9
    return {
        "msgs_per_s": (got - 1) / seconds,
        "gb_per_s": gigabytes / seconds,
        "seconds": seconds,
        "received": got,
        "dsn_cpu_s_per_gb": cpu / max(gigabytes, 1e-9),
    }


def _scrape_cpu_ms(pid: int, url: str, n: int = 100) -> float:
    """The DSN's own CPU milliseconds per /metrics request (idle channel, ``n`` requests)."""
    import psutil

    proc = psutil.Process(pid)
    cpu0 = sum(proc.cpu_times()[:2])
    for _ in range(n):
        with urllib.request.urlopen(url, timeout=10) as resp:
            resp.read()
    return (sum(proc.cpu_times()[:2]) - cpu0) * 1000 / n


def run(frames: int, frame_bytes: int, repeats: int, mode: str) -> dict[str, Any]:
    from beamhub.auth.tokens import SigningKey, TokenIssuer

    if shutil.which("prometheus") is None:
        raise RuntimeError("prometheus is not installed (apt-get install prometheus)")
    tmp = Path(tempfile.mkdtemp(prefix="beamhub-bench-scrape-"))
    key = SigningKey.generate()
    jwks = tmp / "jwks.json"
    jwks.write_text(json.dumps(key.jwks()))
    token = TokenIssuer(key, max_ttl=86400).issue(
        "bench", "p-bench", "stream.read stream.publish", ttl=3600
    )
    port = _free_port()
    dsn_url = f"http://127.0.0.1:{port}"
    dsn = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "beamhub.hub.cli",
            "dsn",
            "--port",
            str(port),
            "--jwks",
            str(jwks),
            "--ephemeral",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "BEAMHUB_HOME": str(tmp)},
    )
    rows: dict[str, list[dict[str, float]]] = {"none": [], "scrape_1s": []}
    try:
        _wait("the DSN", lambda: _http(f"{dsn_url}/api/health")["status"] == "ok")
        channel = _http(
            f"{dsn_url}/api/channels", {"stream": "bench", "mode": mode, "hwm": 256}, token
        )
        cid, endpoints = channel["id"], channel["endpoints"]
        creds = {face: _register(dsn_url, cid, token, face) for face in ("producer", "consumer")}
        _transfer(dsn.pid, endpoints, creds, min(frames, 500), frame_bytes)  # warm-up
        for i in range(repeats):
            order = ["none", "scrape_1s"] if i % 2 == 0 else ["scrape_1s", "none"]
            for cond in order:
                prom = (
                    Prometheus(f"127.0.0.1:{port}", tmp / f"prom-{i}") if cond != "none" else None
                )
                try:
                    before = prom.query("count_over_time(up[10m])")[0] if prom else 0.0
                    row = _transfer(dsn.pid, endpoints, creds, frames, frame_bytes)
                    if prom is not None:
                        time.sleep(1.1)  # the scrape after the transfer lands in the count
                        row["scrapes"] = prom.query("count_over_time(up[10m])")[0] - before - 1
                        row["scrape_duration_s"] = prom.query(
                            "avg_over_time(scrape_duration_seconds[10m])"
                        )[0]
                finally:
                    if prom is not None:
                        prom.stop()
                rows[cond].append(row)
        scrape_cpu_ms = _scrape_cpu_ms(dsn.pid, f"{dsn_url}/metrics")
    finally:
        dsn.terminate()
        dsn.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)

    def med(cond: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[cond] if key in r)

    summary = {
        cond: {
            k: round(med(cond, k), 6)
            for k in ("msgs_per_s", "gb_per_s", "seconds", "dsn_cpu_s_per_gb")
        }
        for cond in rows
    }
    summary["scrape_1s"]["scrapes_during_transfer"] = med("scrape_1s", "scrapes")
    summary["scrape_1s"]["dsn_cpu_ms_per_scrape"] = round(scrape_cpu_ms, 3)
    summary["scrape_1s"]["scrape_duration_ms"] = round(
        med("scrape_1s", "scrape_duration_s") * 1e3, 3
    )
    return {
        "bench": "scrape",
        "mode": mode,
        "frame_bytes": frame_bytes,
        "frames": frames,
        "repeats": repeats,
        "median": summary,
        "ratio_scraped_to_none": round(
            summary["scrape_1s"]["msgs_per_s"] / summary["none"]["msgs_per_s"], 4
        ),
        "runs": rows,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beamhub bench scrape", description=__doc__)
    parser.add_argument("--frames", type=int, default=20000, help="frames per transfer")
    parser.add_argument("--frame-bytes", type=int, default=65536, help="payload bytes per frame")
    parser.add_argument("--repeats", type=int, default=3, help="transfers per condition")
    parser.add_argument("--mode", choices=("l4", "l7"), default="l7", help="the channel's mode")
    parser.add_argument("--json", action="store_true", help="JSON only")
    args = parser.parse_args(argv)
    if args.frames < 10 or args.frame_bytes < 2 or args.repeats < 1:
        parser.error("--frames >= 10, --frame-bytes >= 2 and --repeats >= 1")
    try:
        result = run(args.frames, args.frame_bytes, args.repeats, args.mode)
    except RuntimeError as exc:
        print(f"beamhub bench scrape: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
