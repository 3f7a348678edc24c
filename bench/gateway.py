"""Gateway overhead: authorised req/s and p50/p99 with and without policy + rate limit + audit.

One run starts a server process with two gateways on the same code — ``bare`` (token
verification, then the handler) and ``full`` (token, policy, rate limit, audit record, handler) —
and drives both from this process over keep-alive HTTP in many short alternating rounds, so that
noise from other work on the machine hits both alike. Reports medians over rounds (the throughput
cost is the median of back-to-back full/bare ratios) and the token verification cost per call.

    beamhub bench gateway --json          (or: python -m bench.gateway --json)
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

ENDPOINT = "/api/v1/whoami"


def _serve(state: Path) -> None:
    """Server process: both gateways in one event loop; print their ports; run until stdin ends."""
    from beamhub.auth.tokens import SigningKey, TokenVerifier
    from beamhub.hub.gateway.app import Gateway
    from beamhub.hub.gateway.audit import AuditLog
    from beamhub.hub.gateway.ratelimit import Limit, RateLimiter

    key = SigningKey.load(state / "key.pem")
    audit = AuditLog(state / "audit.jsonl", fsync="interval")
    limiter = RateLimiter(Limit(1e9, 10**9), Limit(1e9, 10**9))  # never refuses: cost only

    async def run() -> None:
        bare = Gateway(TokenVerifier(key.jwks()), layers=False)
        full = Gateway(TokenVerifier(key.jwks()), limiter=limiter, audit=audit)
        urls = [await bare.start_async(0), await full.start_async(0)]
        print(json.dumps(urls), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await bare.stop_async()
        await full.stop_async()

    asyncio.run(run())
    audit.close()


def _round(
    conn: http.client.HTTPConnection, token: str, seconds: float
) -> tuple[float, list[float]]:
    headers = {"Authorization": f"Bearer {token}"}
    latencies = []
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        t0 = time.perf_counter()
        conn.request("GET", ENDPOINT, headers=headers)
        resp = conn.getresponse()
        resp.read()
        t1 = time.perf_counter()
        if resp.status != 200:
            raise RuntimeError(f"benchmark request refused: HTTP {resp.status}")
        latencies.append(t1 - t0)
        if t1 >= deadline:
            return len(latencies) / (t1 - start), latencies


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _token_verify_us(key_path: Path, token: str, n: int = 2000) -> float:
    from beamhub.auth.tokens import SigningKey, TokenVerifier

    verifier = TokenVerifier(SigningKey.load(key_path).jwks())
    for _ in range(100):
        verifier.verify(token)
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n // 5):
            verifier.verify(token)
        samples.append((time.perf_counter() - t0) / (n // 5) * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="beamhub bench gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--rounds", type=int, default=30, help="alternating rounds per path")
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one round")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(Path(args.serve))
        return 0
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")

    from beamhub.auth.tokens import SigningKey, TokenIssuer

    with tempfile.TemporaryDirectory(prefix="beamhub-bench-gw-") as tmp:
        state = Path(tmp)
        key = SigningKey.generate()
        key.save(state / "key.pem")
        token = TokenIssuer(key).issue("bench", "p-bench", "stream.read", ttl=3600)
        server = subprocess.Popen(
            [sys.executable, "-m", "beamhub.bench.gateway", "--serve", str(state)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        try:
            urls = json.loads(server.stdout.readline())
            conns = {}
            for path, url in zip(("bare", "full"), urls, strict=True):
                host, port = url.split("//")[1].split("/")[0].split(":")
                conns[path] = http.client.HTTPConnection(host, int(port), timeout=10)
                _round(conns[path], token, 0.3)  # warm-up: connection, caches, JIT-free paths
            rates: dict[str, list[float]] = {"bare": [], "full": []}
            lat: dict[str, list[float]] = {"bare": [], "full": []}
            p99s: dict[str, list[float]] = {"bare": [], "full": []}
            for i in range(args.rounds):
                order = ("bare", "full") if i % 2 == 0 else ("full", "bare")
                for path in order:
                    rate, latencies = _round(conns[path], token, args.seconds)
                    rates[path].append(rate)
                    lat[path].append(statistics.median(latencies))
                    p99s[path].append(_quantile(latencies, 0.99))
            for conn in conns.values():
                conn.close()
        finally:
            server.stdin.close()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        audit_records = sum(1 for _ in open(state / "audit.jsonl", "rb"))
        verify_us = _token_verify_us(state / "key.pem", token)

    results = [
        {
            "path": path,
            "req_per_s": round(statistics.median(rates[path]), 1),
            "p50_ms": round(statistics.median(lat[path]) * 1e3, 4),
            "p99_ms": round(statistics.median(p99s[path]) * 1e3, 4),
        }
        for path in ("bare", "full")
    ]
    bare, full = results
    report = {
        "results": results,
        "token_verify_us": round(verify_us, 2),
        "endpoint": f"GET {ENDPOINT}",
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
        # cost = 1 - median over rounds of full/bare req/s, each pair measured back to back
        "throughput_cost": round(
            1 - statistics.median(f / b for f, b in zip(rates["full"], rates["bare"], strict=True)),
            4,
        ),
        "p99_added_ms": round(full["p99_ms"] - bare["p99_ms"], 4),
        "audit_records": audit_records,
        "audit_fsync": "interval",
        "targets": {"throughput_cost_max": 0.20, "p99_added_ms_max": 1.0},
    }
    report["targets_met"] = report["throughput_cost"] <= 0.20 and report["p99_added_ms"] <= 1.0
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
