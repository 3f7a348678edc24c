"""`beamhub bench dmz`: DSN throughput across the science DMZ's veth pairs vs the same hop on loopback.

The veth path is the real DMZ (:mod:`beamhub.bench._netns`): a producer in ``instrument`` sends
to the DSN's producer face on the DMZ's instrument-side interface, a consumer in ``compute``
reads the work face on its compute-side interface. The loopback path is the same three programs
in one namespace over 127.0.0.1 (a second DSN in ``dmz``). Every repeat visits every path, mode
(L4, L7) and frame size in turn, so load from other work on the machine hits all alike; figures
are medians, ratios the median of per-repeat veth/loopback ratios. Frames are sent with blocking
sends (back-pressure, never a drop) and counted by sequence number at the consumer; the peers
use the client APIs (:mod:`beamhub.bench._dmz_peer`), so every channel runs with its CURVE
credentials as in production. Needs root for ``ip netns``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from beamhub.bench._netns import (
    ADDRESSES,
    COMPUTE_NET,
    INSTRUMENT_NET,
    DmzTopology,
    NetnsUnavailable,
)

__all__ = ["main", "write_dmz_template"]

CLI = [sys.executable, "-m", "beamhub.hub.cli"]
PEER = [sys.executable, "-m", "beamhub.bench._dmz_peer"]
SIZES = {4 * 1024 * 1024: (240, 16), 64 * 1024: (3000, 256)}  # frame_bytes: (frames, hwm)
MODES = ("l4", "l7")
PATHS = ("veth", "loopback")
PORTS = {"veth": 8100, "loopback": 8101}


def write_dmz_template(path: Path) -> Path:
    """The packaged dev template with the DMZ's networks as its allowlists: producers from the
    instrument network only, consumers on the compute network only."""
    import yaml

    import beamhub.streaming

    default = Path(beamhub.streaming.__file__).parent / "templates" / "default.yaml"
    data = yaml.safe_load(default.read_text())
    data.update(
        name="dmz",
        description="science DMZ: producers from the instrument network, consumers on compute",
        source_cidrs=[INSTRUMENT_NET],
        consumer_cidrs=[COMPUTE_NET],
    )
    path.write_text(yaml.safe_dump(data))
    return path


class Agent:
    """A :mod:`beamhub.bench._dmz_peer` agent in a namespace: one JSON line in, one out."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )

    def ask(self, **cmd: Any) -> dict:
        self.send(**cmd)
        return self.answer(cmd["op"])

    def send(self, **cmd: Any) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def answer(self, op: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"agent {self.proc.args[3]} exited during {op!r}; see {self.log.name}"
            )
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise RuntimeError(f"agent {self.proc.args[3]}: {op} failed: {reply['error']}")
        return reply

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


class DmzBench:
    """The topology, two DSNs (veth faces, loopback), and a producer and consumer per path."""

    def __init__(self, tmp: Path, log: Any) -> None:
        self.tmp, self.log = tmp, log
        self.net = DmzTopology()
        self.procs: list[subprocess.Popen] = []
        self.agents: dict[tuple[str, str], Agent] = {}
        self.env = {**os.environ, "BEAMHUB_HOME": str(tmp / "home")}
        self.url = {
            "veth": {
                "instrument": f"http://{ADDRESSES['dmz_instrument']}:{PORTS['veth']}",
                "compute": f"http://{ADDRESSES['dmz_compute']}:{PORTS['veth']}",
            },
            "loopback": {
                side: f"http://127.0.0.1:{PORTS['loopback']}" for side in ("instrument", "compute")
            },
        }

    def start(self) -> None:
        self.net.create()
        token = subprocess.run(
            [*CLI, "token", "issue", "--project", "bench", "--scope", "stream.publish stream.read"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        self.env["BEAMHUB_TOKEN"] = token
        template = write_dmz_template(self.tmp / "dmz.yaml")
        dsn = [*CLI, "dsn", "--ephemeral", "--reap-interval", "5"]
        self._dsn(
            "veth",
            [
                *dsn,
                *("--host", "0.0.0.0", "--port", str(PORTS["veth"])),
                *("--data-host", ADDRESSES["dmz_compute"]),
                *("--producer-host", ADDRESSES["dmz_instrument"], "--template", str(template)),
            ],
        )
        self._dsn("loopback", [*dsn, "--host", "127.0.0.1", "--port", str(PORTS["loopback"])])
        where = {
            ("veth", "producer"): "instrument",
            ("veth", "consumer"): "compute",
            ("loopback", "producer"): "dmz",
            ("loopback", "consumer"): "dmz",
        }
        for (path, role), side in where.items():
            argv = self.net.argv(side, *PEER, "agent")
            self.agents[(path, role)] = Agent(argv, self.env, self.tmp / f"{path}-{role}.log")

    def _dsn(self, path: str, argv: list[str]) -> None:
        log = (self.tmp / f"dsn-{path}.log").open("w")
        proc = subprocess.Popen(
            self.net.argv("dmz", *argv), env=self.env, stdout=subprocess.PIPE, stderr=log, text=True
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        for line in proc.stdout:  # the DSN prints where it listens, then "Ctrl-C to stop"
            if "Ctrl-C to stop" in line or time.monotonic() > deadline:
                break
        if proc.poll() is not None:
            raise RuntimeError(f"the {path} DSN did not start; see {log.name}")

    def transfer(self, path: str, mode: str, frame_bytes: int, count: int, hwm: int) -> dict:
        consumer, producer = self.agents[(path, "consumer")], self.agents[(path, "producer")]
        body = {"stream": "bench", "mode": mode, "hwm": hwm, "ttl": 3600}
        opened = consumer.ask(op="open", dsn=self.url[path]["compute"], body=body)
        try:
            consumer.send(op="receive", count=count, timeout=30.0)
            producer.ask(
                op="send",
                dsn=self.url[path]["instrument"],
                channel=opened["channel"],
                frame_bytes=frame_bytes,
                count=count,
                hwm=hwm,
            )
            return consumer.answer("receive")
        finally:
            consumer.ask(op="close")

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self.net.destroy()


def _median(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def run(repeats: int, log: Any, *, quick: bool = False) -> dict:
    sizes = {b: (max(20, n // 10), h) for b, (n, h) in SIZES.items()} if quick else SIZES
    raw: dict[tuple[str, str, int], list[dict]] = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="beamhub-bench-dmz-") as tmp:
        bench = DmzBench(Path(tmp), log)
        try:
            bench.start()
            for rep in range(repeats):
                for frame_bytes, (count, hwm) in sizes.items():
                    for mode in MODES:
                        for path in PATHS:
                            r = bench.transfer(path, mode, frame_bytes, count, hwm)
                            raw.setdefault((path, mode, frame_bytes), []).append(r)
                            log(
                                f"repeat {rep + 1}/{repeats} {path:8s} {mode} {frame_bytes:>8d} B:"
                                f" {r['gb_per_s'] or 0:.3f} GB/s {r['msg_per_s'] or 0:.0f} msg/s"
                                f" lost {r['lost']}"
                            )
        finally:
            bench.close()
    results = []
    for (path, mode, frame_bytes), runs in raw.items():
        results.append(
            {
                "path": path,
                "mode": mode,
                "frame_bytes": frame_bytes,
                "gb_per_s": _median([r["gb_per_s"] for r in runs]),
                "msg_per_s": _median([r["msg_per_s"] for r in runs]),
                "lost": sum(r["lost"] for r in runs),
                "gb_per_s_runs": [round(r["gb_per_s"] or 0, 3) for r in runs],
                "frames": sizes[frame_bytes][0],
                "hwm": sizes[frame_bytes][1],
            }
        )
    ratios = {}
    for mode in MODES:
        for frame_bytes in sizes:
            veth, loop = (
                raw.get(("veth", mode, frame_bytes)),
                raw.get(("loopback", mode, frame_bytes)),
            )
            if veth and loop:
                ratios[f"{mode}_veth_vs_loopback_{frame_bytes}"] = _median(
                    [
                        v["gb_per_s"] / b["gb_per_s"]
                        for v, b in zip(veth, loop, strict=True)
                        if v["gb_per_s"] and b["gb_per_s"]
                    ]
                )
    return {
        "results": results,
        "ratios": ratios,
        "repeats": repeats,
        "seconds": round(time.monotonic() - t0, 1),
        "cpus": os.cpu_count(),
        "note": "veth = instrument ns -> DSN in dmz ns (producer face on its instrument-side "
        "address, work face on its compute-side one) -> compute ns; loopback = the same three "
        "programs in one ns over 127.0.0.1; CURVE on every channel; medians of repeats",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beamhub bench dmz", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON result only")
    parser.add_argument("--repeats", type=int, default=5, help="runs per path, mode and size")
    parser.add_argument("--quick", action="store_true", help="few frames: a smoke test")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        result = run(args.repeats, log, quick=args.quick)
    except NetnsUnavailable as exc:
        print(f"beamhub bench dmz: cannot build the DMZ: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
