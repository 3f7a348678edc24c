"""`beamhub bench stream`: direct ZeroMQ vs a bare proxy hop vs the DSN (L4, L7) vs files, one run.

Three kinds of process: a *producer* process (sends frames stamped with ``t_ns``), a *hop*
process per path (a bare ``zmq.proxy``, or a DataPlane channel in L4 or L7 mode; its CPU time is
read with psutil around each transfer), and this process, the consumer. Every repeat visits every
path in turn, so machine load shared by other work hits all paths alike; figures are medians.

Per path and frame size: throughput at full speed (GB/s from the first to the last frame
received), latency p50/p99 *paced* (``p50_ms``/``p99_ms``: frames at a fixed rate well below
capacity, so it is the path's own delay) and at full speed (``*_full``: includes queueing behind
the high-water marks), frames lost, and CPU seconds of the hop process per GB.

Small events (issue 13): sizes are ``--sizes`` (default 1 KiB, 64 KiB, 4 MiB), and every row also
gives messages (events) per second and the hop's CPU microseconds per event. So that neither end is
the bottleneck, the producer sends pre-encoded headers (a byte template, formatted per message:
~0.3 µs instead of a JSON dump) and the consumer reads ``seq``/``t_ns``/``batch`` from that fixed
layout instead of validating every header (validation is the hop's job here, and it is what is
measured). ``direct`` (producer to consumer, no hop) is the physical anchor: what one Python
producer and one Python consumer can move at all. At sizes below 64 KiB two more paths send
*batch messages* (``--batch`` events under one header, :func:`beamhub.streaming.wire.send_batch`
format): ``proxy_batch`` and ``l7_batch``; their rates count events. ``--header binary`` sends the
wire format's binary header layout (:func:`beamhub.streaming.wire.binary_header_packer`) on every
path instead of JSON, so the L7 gateway's check of that layout is what is measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from typing import Any

__all__ = ["main"]

PATHS = ("direct", "proxy", "l4", "l7", "file", "proxy_batch", "l7_batch")
#: Paths that carry batch messages (only at sizes below BATCH_BELOW), run on the hop process
#: of their single-message path.
BATCH_PATHS = ("proxy_batch", "l7_batch")
HOP_OF = {"proxy_batch": "proxy", "l7_batch": "l7"}
BATCH_BELOW = 64 * 1024
DEFAULT_BATCH = 64
SIZES = {
    1024: (120_000, 1000, 5000.0, 1000),
    64 * 1024: (6000, 256, 1000.0, 400),
    4 * 1024 * 1024: (240, 16, 100.0, 40),
}
#        frame_bytes: (frames at full speed, hwm, paced rate Hz, paced frames)
#: At most this many frames through the file path at full speed.
FILE_FRAMES_MAX = 3000
#: The header template: seq, t_ns and batch first, so the consumer finds them without a JSON parse.
HEADER_TEMPLATE = (
    b'{"v":1,"seq":%d,"t_ns":%d,"batch":%d,"stream":"bench","dtype":"<u2","shape":[%d],'
    b'"run":0,"rev":0,"meta":{}}'
)
#: Header forms ``--header`` accepts.
HEADERS = ("json", "binary")
_BINARY_MAGIC = 0xB7
#: The consumer reads seq and t_ns (offset 8) and batch (offset 40) from a binary header.
_SEQ_T = struct.Struct("<QQ")
_BATCH = struct.Struct("<I")
#: The file consumer's directory poll interval: 1 ms is a best case (tools often poll at 0.1-1 s).
FILE_POLL_S = 0.001


def _frame(frame_bytes: int) -> Any:
    import numpy as np

    return np.random.default_rng(0).integers(0, 65535, frame_bytes // 2, dtype="<u2")


def _producer_main(conn: Any) -> None:
    """Producer process: sends (or writes) frames on command, headers from a byte template."""
    import zmq

    from beamhub.streaming.wire import FrameHeader, binary_header_packer, decode_header

    ctx = zmq.Context()
    arrays: dict[tuple[int, int], Any] = {}
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            break
        kind, target, frame_bytes, count, rate, hwm, batch, header_form = cmd
        data = arrays.get((frame_bytes, batch))
        if data is None:
            data = _frame(frame_bytes * batch)
            arrays[(frame_bytes, batch)] = data
            # the template is a valid header for this payload (checked once, not per message)
            head = HEADER_TEMPLATE % (0, 1, batch, frame_bytes // 2)
            assert decode_header(head).nbytes == data.nbytes, head
        packer = binary_header_packer("bench", "<u2", (frame_bytes // 2,), batch=batch)
        assert decode_header(packer(0, 1)).nbytes == data.nbytes
        period = 1.0 / rate if rate else 0.0
        t_next = time.perf_counter()
        if kind == "file":
            for seq in range(count):
                header = FrameHeader("bench", seq, data.dtype.str, data.shape, t_ns=time.time_ns())
                tmp = os.path.join(target, f".{seq:09d}.tmp")
                with open(tmp, "wb") as fh:
                    raw = header.to_bytes()
                    fh.write(len(raw).to_bytes(4, "little") + raw)
                    fh.write(memoryview(data).cast("B"))
                os.rename(tmp, os.path.join(target, f"{seq:09d}.frame"))  # readers see whole files
                if period:
                    t_next += period
                    time.sleep(max(0.0, t_next - time.perf_counter()))
            conn.send("sent")
            continue
        sock = ctx.socket(zmq.PUSH)
        sock.sndhwm = hwm
        sock.connect(target)
        payload = memoryview(data).cast("B")
        copy = payload.nbytes < 64 * 1024  # as send_frame does
        template, shape = HEADER_TEMPLATE, frame_bytes // 2
        send, more, now = sock.send, zmq.SNDMORE, time.time_ns
        for msg in range(count):
            if header_form == "binary":
                send(packer(msg * batch, now()), more)
            else:
                send(template % (msg * batch, now(), batch, shape), more)
            send(payload, copy=copy)
            if period:
                t_next += period
                time.sleep(max(0.0, t_next - time.perf_counter()))
        sock.close(linger=-1)  # returns once everything is handed to the peer
        conn.send("sent")
    ctx.term()


def _hop_main(kind: str, conn: Any) -> None:
    """Hop process: a bare zmq.proxy or a DataPlane channel, rebuilt per frame size."""
    import zmq

    from beamhub.streaming.dataplane import ChannelSpec, DataPlane

    plane = DataPlane("127.0.0.1") if kind in ("l4", "l7") else None
    proxy: tuple[Any, threading.Thread] | None = None
    n = 0

    def close_proxy() -> None:
        if proxy is not None:
            proxy[0].term()  # the proxy thread gets ETERM, closes its sockets
            proxy[1].join()

    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            break
        hwm = cmd[1]
        n += 1
        if plane is not None:
            for cid in plane.channels():
                plane.remove(cid)
            spec = ChannelSpec(
                f"bench{n}",
                "bench",
                "bench",
                kind,
                ("127.0.0.1/32",),
                ("127.0.0.1/32",),
                hwm,
                8 * 1024 * 1024,
                None,
            )
            ep = plane.provision(spec)
            conn.send((ep.producer, ep.work))
            continue
        close_proxy()
        ctx = zmq.Context()
        ready: list[str] = []
        started = threading.Event()

        def run(
            ctx: zmq.Context = ctx,
            ready: list[str] = ready,
            started: threading.Event = started,
            hwm: int = hwm,
        ) -> None:
            front, back = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
            front.rcvhwm = back.sndhwm = hwm
            for sock in (front, back):
                sock.bind("tcp://127.0.0.1:*")
                ready.append(sock.last_endpoint.decode())
            started.set()
            try:
                zmq.proxy(front, back)
            except zmq.ContextTerminated:
                pass
            finally:
                front.close(linger=0)
                back.close(linger=0)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started.wait()
        proxy = (ctx, thread)
        conn.send((ready[0], ready[1]))
    close_proxy()
    if plane is not None:
        plane.close()


def _receive(sock: Any, count: int, timeout_s: float) -> tuple[list[float], float, float, int, int]:
    """Receive up to ``count`` events; return latencies (ms), first and last arrival, gaps, events.

    Reads seq, t_ns and batch from the producer's fixed header layout (HEADER_TEMPLATE, or the
    binary layout's offsets): a consumer that parsed JSON per message would be slower than the
    hop it measures.
    """
    latencies, first, last, expected, gaps, events = [], 0.0, 0.0, 0, 0, 0
    recv, poll, now_ns = sock.recv, sock.poll, time.time_ns
    wait_ms = int(timeout_s * 1000)
    while events < count:
        if not poll(wait_ms):
            break
        head = recv()
        recv(copy=False)  # the payload: always the second and last part of this producer's messages
        if head[0] == _BINARY_MAGIC:
            seq, t_ns = _SEQ_T.unpack_from(head, 8)
            (batch,) = _BATCH.unpack_from(head, 40)
        else:
            _, seq, t_ns, batch, _ = head.split(b",", 4)
            seq, t_ns, batch = int(seq[6:]), int(t_ns[7:]), int(batch[8:])
        now = now_ns()
        latencies.append((now - t_ns) / 1e6)
        gaps += max(0, seq - expected)
        expected = seq + batch
        events += batch
        last = now / 1e9
        if events == batch:
            first = last
    return latencies, first, last, gaps, events


def _receive_files(
    folder: str, count: int, timeout_s: float, poll_s: float = FILE_POLL_S
) -> tuple[list[float], float, float, int]:
    import numpy as np

    from beamhub.streaming.wire import decode_header

    latencies, first, last = [], 0.0, 0.0
    deadline = time.monotonic() + timeout_s
    while len(latencies) < count and time.monotonic() < deadline:
        names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(".frame"))
        if not names:
            time.sleep(poll_s)
            continue
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as fh:
                blob = fh.read()
            os.unlink(path)
            size = int.from_bytes(blob[:4], "little")
            header = decode_header(blob[4 : 4 + size])
            np.frombuffer(blob, dtype=header.dtype, offset=4 + size).reshape(header.shape)
            now = time.time_ns()
            latencies.append((now - header.t_ns) / 1e6)
            last = now / 1e9
            if len(latencies) == 1:
                first = last
        deadline = time.monotonic() + timeout_s
    return latencies, first, last, 0


def _percentile(values: list[float], q: float) -> float:
    import numpy as np

    return round(float(np.percentile(values, q)), 3) if values else float("nan")


class Bench:
    """Owns the producer and hop processes and runs one transfer at a time."""

    def __init__(self, file_poll_s: float = FILE_POLL_S) -> None:
        import psutil

        self.file_poll_s = file_poll_s
        self.mp = mp.get_context("spawn")
        self.producer_conn, child = self.mp.Pipe()
        self.producer = self.mp.Process(target=_producer_main, args=(child,), daemon=True)
        self.producer.start()
        self.hops: dict[str, tuple[Any, Any, Any]] = {}
        for kind in ("proxy", "l4", "l7"):
            conn, child = self.mp.Pipe()
            proc = self.mp.Process(target=_hop_main, args=(kind, child), daemon=True)
            proc.start()
            self.hops[kind] = (proc, conn, psutil.Process(proc.pid))
        self.tmp = tempfile.mkdtemp(prefix="beamhub-bench-files-")

    def close(self) -> None:
        self.producer_conn.send(("stop",))
        for _proc, conn, _ in self.hops.values():
            conn.send(("stop",))
        for proc in [self.producer, *(p for p, _, _ in self.hops.values())]:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def transfer(
        self,
        path: str,
        frame_bytes: int,
        count: int,
        hwm: int,
        rate: float | None,
        batch: int = 1,
        header: str = "json",
    ) -> dict:
        """One transfer of ``count`` events (``count // batch`` messages of ``batch`` events)."""
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.PULL)
        sock.rcvhwm = hwm
        cpu_proc = None
        messages = max(1, count // batch)
        count = messages * batch
        try:
            if path == "direct":
                sock.bind("tcp://127.0.0.1:*")
                target = sock.last_endpoint.decode()
            elif path == "file":
                target = self.tmp
            else:
                _proc, conn, cpu_proc = self.hops[HOP_OF.get(path, path)]
                conn.send(("setup", hwm))
                target, work = conn.recv()
                sock.connect(work)
            kind = "file" if path == "file" else "zmq"
            cpu0 = sum(cpu_proc.cpu_times()[:2]) if cpu_proc else None
            self.producer_conn.send((kind, target, frame_bytes, messages, rate, hwm, batch, header))
            if path == "file":
                lat, first, last, gaps = _receive_files(self.tmp, count, 20.0, self.file_poll_s)
                events = len(lat)
            else:
                lat, first, last, gaps, events = _receive(sock, count, 20.0)
            cpu1 = sum(cpu_proc.cpu_times()[:2]) if cpu_proc else None
            if not self.producer_conn.poll(30):
                raise RuntimeError("the producer process did not finish")
            self.producer_conn.recv()
        finally:
            sock.close(linger=0)
            ctx.term()
        gb = frame_bytes * events / 1e9
        span = last - first
        per_s = ((events - batch) / span) if span > 0 else float("nan")  # after the first message
        return {
            "msg_per_s": per_s,
            "gb_per_s": per_s * frame_bytes / 1e9,
            "p50_ms": _percentile(lat, 50),
            "p99_ms": _percentile(lat, 99),
            "lost": count - events + gaps,
            "dsn_cpu_s_per_gb": ((cpu1 - cpu0) / gb) if cpu_proc and gb else None,
            "dsn_cpu_us_per_msg": ((cpu1 - cpu0) * 1e6 / events) if cpu_proc and events else None,
        }


def _median(values: list[Any]) -> Any:
    """Median to 6 significant digits (4 decimals made 0.0012 GB/s of 1 KiB files 2 % off)."""
    values = [v for v in values if v is not None]
    return float(f"{statistics.median(values):.6g}") if values else None


def run(
    repeats: int,
    paths: tuple[str, ...],
    log: Any,
    *,
    quick: bool = False,
    file_poll_s: float = FILE_POLL_S,
    sizes: tuple[int, ...] = tuple(SIZES),
    batch: int = DEFAULT_BATCH,
    header: str = "json",
) -> dict:
    plan = {size: SIZES.get(size) or _plan_for(size) for size in sizes}
    if quick:  # a smoke run for tests: few frames, same code paths
        plan = {size: (max(20, n // 50), hwm, rate, 10) for size, (n, hwm, rate, _) in plan.items()}
    bench = Bench(file_poll_s)
    raw: dict[tuple[str, int], list[dict]] = {}
    loads: list[float] = []
    t0 = time.monotonic()
    try:
        for rep in range(repeats):
            for frame_bytes, (count, hwm, rate, paced_count) in plan.items():
                for path in paths:
                    is_batch = path in BATCH_PATHS
                    if is_batch and frame_bytes >= BATCH_BELOW:
                        continue
                    n = batch if is_batch else 1
                    # a file per frame is slow: a few thousand files are enough for its rate
                    frames = min(count, FILE_FRAMES_MAX) if path == "file" else count
                    full = bench.transfer(path, frame_bytes, frames, hwm, None, n, header)
                    paced = bench.transfer(
                        path,
                        frame_bytes,
                        paced_count * n,
                        hwm,
                        rate / n if is_batch else rate,
                        n,
                        header,
                    )
                    raw.setdefault((path, frame_bytes), []).append({"full": full, "paced": paced})
                    loads.append(os.getloadavg()[0])
                    log(
                        f"repeat {rep + 1}/{repeats} {path:11s} {frame_bytes:>8d} B: "
                        f"{full['msg_per_s']:>9.0f} msg/s {full['gb_per_s']:.2f} GB/s, hop "
                        f"{full['dsn_cpu_us_per_msg'] or 0:.2f} us/msg, paced p50 "
                        f"{paced['p50_ms']} ms, lost {full['lost'] + paced['lost']}"
                    )
    finally:
        bench.close()
    results = []
    for (path, frame_bytes), runs in raw.items():
        count, hwm, rate, paced_count = plan[frame_bytes]
        results.append(
            {
                "path": path,
                "frame_bytes": frame_bytes,
                "batch": batch if path in BATCH_PATHS else 1,
                "msg_per_s": _median([r["full"]["msg_per_s"] for r in runs]),
                "gb_per_s": _median([r["full"]["gb_per_s"] for r in runs]),
                "dsn_cpu_us_per_msg": _median([r["full"]["dsn_cpu_us_per_msg"] for r in runs]),
                "p50_ms": _median([r["paced"]["p50_ms"] for r in runs]),
                "p99_ms": _median([r["paced"]["p99_ms"] for r in runs]),
                "lost": sum(r["full"]["lost"] + r["paced"]["lost"] for r in runs),
                "dsn_cpu_s_per_gb": _median([r["full"]["dsn_cpu_s_per_gb"] for r in runs]),
                "p50_ms_full": _median([r["full"]["p50_ms"] for r in runs]),
                "p99_ms_full": _median([r["full"]["p99_ms"] for r in runs]),
                "msg_per_s_runs": [round(r["full"]["msg_per_s"]) for r in runs],
                "frames": count,
                "hwm": hwm,
                "latency": f"paced at {rate:g} Hz ({paced_count} frames); *_full at full speed",
            }
        )
    ratios: dict[str, float | None] = {}
    pairs = [
        ("l4", "proxy"),
        ("l7", "proxy"),
        ("direct", "proxy"),
        ("proxy", "direct"),
        ("l7_batch", "proxy"),
        ("l7_batch", "proxy_batch"),
    ]
    for frame_bytes in plan:
        by = {r["path"]: r for r in results if r["frame_bytes"] == frame_bytes}
        for path, basis in pairs:
            runs, base = raw.get((path, frame_bytes)), raw.get((basis, frame_bytes))
            if base and runs:
                # Median of per-repeat ratios: each pair ran back to back under the same load.
                ratios[f"{path}_vs_{basis}_{frame_bytes}"] = _median(
                    [
                        r["full"]["msg_per_s"] / b["full"]["msg_per_s"]
                        for r, b in zip(runs, base, strict=True)
                        if b["full"]["msg_per_s"] > 0
                    ]
                )
        if "file" in by and "l7" in by and by["l7"]["p50_ms"]:
            ratios[f"file_vs_l7_p50_{frame_bytes}"] = round(
                by["file"]["p50_ms"] / by["l7"]["p50_ms"], 2
            )
    return {
        "results": results,
        "ratios": ratios,
        "repeats": repeats,
        "batch": batch,
        "header": header,
        "seconds": round(time.monotonic() - t0, 1),
        "cpus": os.cpu_count(),
        "load_avg_1m": {"min": min(loads, default=None), "max": max(loads, default=None)},
        "file_poll_ms": file_poll_s * 1000,
        "note": "msg/s and GB/s at full speed (events for *_batch paths); p50/p99 paced; DSN CPU "
        "= hop process (psutil) per event; ratios are msg/s, median of per-repeat ratios; "
        "l4/l7 channels run with their monitor enabled (no viewers) and ZAP on every face",
    }


def _plan_for(size: int) -> tuple[int, int, float, int]:
    """Frames, hwm, paced rate and paced frames for a size not in SIZES (about 0.5 GB moved)."""
    frames = max(200, min(200_000, 500_000_000 // max(size, 1)))
    return frames, max(16, min(1000, 16 * 1024 * 1024 // max(size, 1))), 1000.0, 200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="beamhub bench stream", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", action="store_true", help="print the JSON result only")
    parser.add_argument("--repeats", type=int, default=5, help="runs per path and size (median)")
    parser.add_argument(
        "--quick", action="store_true", help="few frames: a smoke test, not a measurement"
    )
    parser.add_argument(
        "--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS)
    )
    parser.add_argument(
        "--file-poll-ms",
        type=float,
        default=FILE_POLL_S * 1000,
        help="the file consumer's poll interval (default 1 ms, a best case for files)",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(str(s) for s in SIZES),
        help="comma-separated message sizes in bytes (default 1024,65536,4194304)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        help=f"events per batch message on {', '.join(BATCH_PATHS)} (default {DEFAULT_BATCH})",
    )
    parser.add_argument(
        "--header",
        choices=HEADERS,
        default="json",
        help="header form on the zmq paths: json (default) or the binary layout",
    )
    args = parser.parse_args(argv)
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = set(paths) - set(PATHS)
    if unknown or args.repeats < 1:
        parser.error(
            f"--paths: unknown {sorted(unknown)}; choose from {', '.join(PATHS)}"
            if unknown
            else "--repeats must be at least 1"
        )
    try:
        sizes = tuple(int(s) for s in args.sizes.split(",") if s)
    except ValueError:
        sizes = ()
    if not sizes or any(s < 2 or s % 2 or s > 1 << 30 for s in sizes):
        parser.error(
            f"--sizes: {args.sizes!r} must be even byte counts from 2 to 2^30, comma-separated"
        )
    if not 1 <= args.batch <= 4096:
        parser.error("--batch must be from 1 to 4096 events")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = run(
        args.repeats,
        paths,
        log,
        quick=args.quick,
        file_poll_s=args.file_poll_ms / 1000,
        sizes=sizes,
        batch=args.batch,
        header=args.header,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
