"""Peak finding throughput per core on 4 MiB frames: one numpy process vs Dask workers, same frames.

One run: simulate a pool of 1024x1024 float32 frames (the simulated detector at its default
settings), score the finder against the truth in their headers (recall, precision, hit accuracy),
then time

* ``numpy``: :class:`beamhub.streaming.analysis.Analyzer` in this process, frames already in memory;
* ``dask`` with 1 and 2 workers: a ``LocalCluster`` of single-threaded worker processes, each
  running :func:`beamhub.streaming.analysis_dask.analysis_worker` and pulling its own frames with a
  ``StreamConsumer`` from a PUSH socket that this process feeds (the real path: frames cross
  ZeroMQ, never the scheduler).

A pass ends when the last frame is analysed (producer stamp + the result's latency, both from this
host's clock), not when its result batch arrives. Each mode runs ``--repeats`` passes; the JSON
gives medians, per-pass figures, the parallel efficiency ``fps(dask, n) / (n * fps(numpy))`` and
the scaling efficiency ``fps(dask, n) / (n * fps(dask, 1))`` (transport cost factored out).
On a shared 2-core machine the sender (this process) competes with the workers; its CPU share is
reported so that a missed target can be explained.

Finder vs OnDA Monitor (``finders`` in the JSON, issue 13): at hit fractions 0.1, 0.3 and 1.0
(``--hit-fractions``), the same simulated frames go through beamhub's finder, OM's peakfinder8 in
its default mode and in its fast mode (``ondamonitor``, an optional dependency: ``pip install -e
'.[bench]'``), all with the same parameters and beam centre, interleaved pass by pass. Throughput
is frames per CPU second of this process (frames/s/core); recall and precision are against the
simulator's truth; ``agreement`` is ``2·matched / (peaks_a + peaks_b)`` between beamhub's and OM's
peaks (within 2 px). ``--finders-only`` skips the Dask passes.

    beamhub bench analysis --json        (or: python -m bench.analysis --json)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from typing import Any

__all__ = ["main"]

SHAPE = (1024, 1024)
TARGET_FPS_PER_CORE = 50.0
TARGET_EFFICIENCY = 0.8
HIT_FRACTIONS = (0.1, 0.3, 1.0)
#: beamhub's finder against OM's fast mode on frames that all carry peaks (issue 13)
TARGET_VS_OM_FAST = 1.0
TARGET_ACCURACY = 0.99


def _pool(n: int, seed: int) -> list[Any]:
    from beamhub.streaming.simulator import SimulatedDetector
    from beamhub.streaming.wire import Frame, FrameHeader

    det = SimulatedDetector(SHAPE, seed=seed)
    frames = []
    for i in range(n):
        data, meta = det.generate()
        header = FrameHeader(
            stream="bench", seq=i, dtype=data.dtype.str, shape=data.shape, meta=meta
        )
        frames.append(Frame(header, data))
    return frames


def _accuracy(pool: list[Any]) -> dict[str, float]:
    from beamhub.streaming.analysis import Analyzer
    from beamhub.streaming.peakfinder import match_peaks

    analyzer = Analyzer()
    tp = fp = fn = agree = 0
    for frame in pool:
        result = analyzer.analyse(frame)
        a, b, c = match_peaks(result.peaks, frame.header.meta["peaks"], tolerance_px=2.0)
        tp, fp, fn = tp + a, fp + b, fn + c
        agree += result.hit == frame.header.meta["hit"]
    return {
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "hit_accuracy": agree / len(pool),
        "true_peaks": tp + fn,
        "hits_in_pool": sum(f.header.meta["hit"] for f in pool),
    }


def _finders(
    hit_fractions: tuple[float, ...], pool_size: int, repeats: int, seed: int, log: Any
) -> dict[str, Any]:
    """beamhub's finder and OM's peakfinder8 (default, fast) on the same frames, one run."""
    from beamhub.bench._onda import OnDAFinder, om_unavailable
    from beamhub.streaming.peakfinder import PeakFinderParams, find_peaks, match_peaks
    from beamhub.streaming.simulator import SimulatedDetector

    params = PeakFinderParams()
    why_not = om_unavailable()
    rows = []
    for hf in hit_fractions:
        det = SimulatedDetector(SHAPE, seed=seed, hit_fraction=hf)
        pool = [det.generate() for _ in range(pool_size)]
        center = tuple(pool[0][1]["beam_center"])
        finders: dict[str, Any] = {
            "beamhub": lambda f, c=center: find_peaks(f, params, center=c).peaks[:, :3]
        }
        if why_not is None:
            for name, fast in (("om", False), ("om_fast", True)):
                om = OnDAFinder(SHAPE, center, params, fast=fast, seed=seed)
                finders[name] = om.find
        found = {name: [fn(frame) for frame, _ in pool] for name, fn in finders.items()}  # warm
        rates: dict[str, list[float]] = {name: [] for name in finders}
        for _ in range(repeats):
            for name, fn in finders.items():  # interleaved: load hits every finder alike
                cpu0 = time.process_time()
                for frame, _ in pool:
                    fn(frame)
                rates[name].append(len(pool) / max(time.process_time() - cpu0, 1e-9))
        row: dict[str, Any] = {
            "hit_fraction": hf,
            "frames": pool_size,
            "hits": sum(m["hit"] for _, m in pool),
            "true_peaks": sum(len(m["peaks"]) for _, m in pool),
        }
        for name in finders:
            tp = fp = fn_ = 0
            for peaks, (_, meta) in zip(found[name], pool, strict=True):
                a, b, c = match_peaks(peaks, meta["peaks"], tolerance_px=2.0)
                tp, fp, fn_ = tp + a, fp + b, fn_ + c
            row[name] = {
                "frames_per_s_per_core": round(statistics.median(rates[name]), 1),
                "passes": [round(r, 1) for r in rates[name]],
                "recall": round(tp / (tp + fn_), 4) if tp + fn_ else 1.0,
                "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
                "peaks": sum(len(p) for p in found[name]),
            }
        for name in ("om", "om_fast"):
            if name not in finders:
                continue
            matched = sum(
                match_peaks(a, b, tolerance_px=2.0)[0]
                for a, b in zip(found["beamhub"], found[name], strict=True)
            )
            total = row["beamhub"]["peaks"] + row[name]["peaks"]
            row[f"agreement_vs_{name}"] = round(2 * matched / total, 4) if total else 1.0
            # per-pass ratios: each pair of passes ran back to back
            row[f"beamhub_vs_{name}"] = round(
                statistics.median(
                    a / b for a, b in zip(rates["beamhub"], rates[name], strict=True)
                ),
                3,
            )
        log(
            f"hit fraction {hf}: "
            + ", ".join(f"{n} {row[n]['frames_per_s_per_core']} f/s/core" for n in finders)
        )
        rows.append(row)
    full = next((r for r in rows if r["hit_fraction"] == 1.0), None)
    meets = None
    if full is not None and why_not is None:
        meets = {
            "vs_om_fast": full["beamhub_vs_om_fast"] >= TARGET_VS_OM_FAST,
            "recall_precision": all(
                r["beamhub"]["recall"] >= TARGET_ACCURACY
                and r["beamhub"]["precision"] >= TARGET_ACCURACY
                for r in rows
            ),
            "agreement": all(
                r["agreement_vs_om"] >= TARGET_ACCURACY
                and r["agreement_vs_om_fast"] >= TARGET_ACCURACY
                for r in rows
            ),
        }
    return {
        "rows": rows,
        "om": "ondamonitor peakfinder8, default and fast mode (100 px per bin)"
        if why_not is None
        else why_not,
        "params": params.to_dict(),
        "targets": {
            "beamhub_vs_om_fast_at_hit_fraction_1": TARGET_VS_OM_FAST,
            "recall_precision_agreement": TARGET_ACCURACY,
        },
        "meets_targets": meets,
    }


def _numpy_passes(pool: list[Any], frames: int, repeats: int) -> tuple[list[float], float]:
    """Frames/s per pass, and the median CPU milliseconds per frame."""
    from beamhub.streaming.analysis import Analyzer

    analyzer = Analyzer()
    analyzer.analyse(pool[0])  # geometry cache
    rates, cpu_ms = [], []
    for _ in range(repeats):
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i in range(frames):
            analyzer.analyse(pool[i % len(pool)])
        rates.append(frames / (time.perf_counter() - t0))
        cpu_ms.append((time.process_time() - cpu0) * 1e3 / frames)
    return rates, statistics.median(cpu_ms)


def _worker_cpu_s() -> float:
    """CPU seconds used so far by this process (run on each Dask worker)."""
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def _send(push: Any, pool: list[Any], first_seq: int, n: int) -> dict[int, float]:
    """Send ``n`` frames from the pool; returns each seq's send stamp (seconds, this host)."""
    from beamhub.streaming.wire import FrameHeader, send_frame

    stamps = {}
    for i in range(n):
        frame = pool[(first_seq + i) % len(pool)]
        t_ns = time.time_ns()
        header = FrameHeader(**{**frame.header.__dict__, "seq": first_seq + i, "t_ns": t_ns})
        send_frame(push, header, frame.data)
        stamps[first_seq + i] = t_ns / 1e9
    return stamps


def _sender_cpu_s() -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def _dask_passes(
    pool: list[Any], counts: list[int], frames: int, repeats: int, log: Any
) -> dict[int, dict[str, list[float]]]:
    """Passes with each worker count in ``counts``, interleaved round by round on one cluster of
    ``max(counts)`` workers (a session of n tasks per pass), so load swings hit every count
    alike; per pass: frames/s, the sender's cores, the workers' CPU ms per frame, analysis ms."""
    import dask
    import zmq
    from distributed import Client, LocalCluster
    from zmq.utils.monitor import recv_monitor_message

    from beamhub.streaming.analysis_dask import (
        STREAMING_WORKER_CONFIG,
        STREAMING_WORKER_ENV,
        AnalysisSession,
    )
    from beamhub.streaming.consumer import StreamConsumer

    out = {
        n: {"rates": [], "sender": [], "worker_cpu_ms": [], "analysis_ms": [], "cores": []}
        for n in counts
    }
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    port = push.bind_to_random_port("tcp://127.0.0.1")
    monitor = push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    with dask.config.set(
        {
            "distributed.nanny.pre-spawn-environ": {
                **dask.config.get("distributed.nanny.pre-spawn-environ"),
                **STREAMING_WORKER_ENV,
            },
            **STREAMING_WORKER_CONFIG,
        }
    ):
        cluster = LocalCluster(
            n_workers=max(counts),
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",
            scheduler_kwargs={"dashboard": False},
            host="127.0.0.1",
        )
    client = Client(cluster)
    seq = 0
    try:
        factory = functools.partial(StreamConsumer, f"tcp://127.0.0.1:{port}", hwm=2)
        for r in range(repeats):
            for n in counts:
                session = AnalysisSession(client, factory, workers=n, flush_interval_s=0.1)
                session.wait_ready(timeout=60)
                connected, deadline = 0, time.monotonic() + 30
                while connected < n:  # PUSH sends only to connected peers: wait for all n
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"only {connected} of {n} workers connected")
                    if monitor.poll(200):
                        event = recv_monitor_message(monitor)["event"]
                        connected += event == zmq.EVENT_HANDSHAKE_SUCCEEDED
                warm = 2 * n  # each worker builds its geometry cache once
                _send(push, pool, seq, warm)
                seq += warm
                session.wait_for(lambda s=session, w=warm: s.stats.frames >= w, 60, "warm-up")
                counted = session.stats.frames
                wcpu0 = sum(client.run(_worker_cpu_s).values())
                cpu0, t0 = _sender_cpu_s(), time.time()
                stamps = _send(push, pool, seq, frames)
                seq += frames
                seen = session.wait_for(
                    lambda s=session, c=counted: s.stats.frames >= c + frames, 120, "frames"
                )
                cpu = _sender_cpu_s() - cpu0  # this process: sender + scheduler + client
                wcpu = sum(client.run(_worker_cpu_s).values()) - wcpu0
                # the pass ends when its last frame was analysed (send stamp + analysed latency)
                end = max(stamps[x.seq] + x.latency_s for x in seen if x.seq in stamps)
                wall = end - t0
                o = out[n]
                o["rates"].append(frames / wall)
                o["sender"].append(cpu / wall)
                o["worker_cpu_ms"].append(wcpu * 1e3 / frames)
                o["cores"].append(wcpu / wall)
                o["analysis_ms"].append(
                    statistics.median(x.analysis_s * 1e3 for x in seen if x.seq in stamps)
                )
                session.stop()
                while monitor.poll(0):  # the stopped session's disconnects
                    recv_monitor_message(monitor)
                log(f"round {r + 1}: dask x{n}: {o['rates'][-1]:.1f} frames/s")
    finally:
        client.close()
        cluster.close()
        push.disable_monitor()
        monitor.close(linger=0)
        push.close(linger=0)
        ctx.term()
    return out


def _scaling_ceiling(results: list[dict[str, Any]], cores: int) -> dict[str, float]:
    """The best scaling efficiency this machine allows, from the in-run CPU costs per frame.

    n workers need ``n`` cores at most, and every frame also costs the sender (on the same
    machine here) its share: fps(n) <= min(n, cores) / worker_ms and <= cores / (worker_ms +
    sender_ms). The ceiling is fps_max(n) / (n * fps_max(1)) with other load at zero.
    """
    dask = {r["workers"]: r for r in results if r["mode"] == "dask"}
    if 1 not in dask:
        return {}

    def fps_max(r: dict[str, Any], n: int) -> float:
        w, s = r["cpu_ms_per_frame"], r["sender_cpu_ms_per_frame"]
        return min(min(n, cores) * 1e3 / w, cores * 1e3 / (w + s))

    one = fps_max(dask[1], 1)
    return {str(n): round(fps_max(r, n) / (n * one), 3) for n, r in dask.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="beamhub bench analysis",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--frames", type=int, default=200, help="frames per timed pass")
    parser.add_argument("--pool", type=int, default=24, help="distinct simulated frames")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per mode")
    parser.add_argument("--workers", default="1,2", help="Dask worker counts, comma-separated")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument(
        "--hit-fractions",
        default=",".join(str(h) for h in HIT_FRACTIONS),
        help="hit fractions of the finder comparison (default 0.1,0.3,1.0)",
    )
    parser.add_argument(
        "--finders-only", action="store_true", help="only the finder comparison (no Dask passes)"
    )
    args = parser.parse_args(argv)
    try:
        hit_fractions = tuple(float(h) for h in args.hit_fractions.split(",") if h.strip())
    except ValueError:
        hit_fractions = ()
    if not hit_fractions or not all(0.0 <= h <= 1.0 for h in hit_fractions):
        parser.error(f"--hit-fractions: {args.hit_fractions!r} must be numbers from 0 to 1")
    try:
        counts = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--workers: {args.workers!r} is not a comma-separated list of integers")
    if args.frames < 1 or args.pool < 1 or args.repeats < 1 or not counts or min(counts) < 1:
        parser.error("--frames, --pool, --repeats and every --workers count must be >= 1")

    def say(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    load_before = os.getloadavg()
    finders = _finders(hit_fractions, args.pool, args.repeats, args.seed, say)
    if args.finders_only:
        print(
            json.dumps(
                {
                    "finders": finders,
                    "cpu_count": os.cpu_count(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "seconds": round(time.monotonic() - started, 1),
                },
                indent=None if args.json else 2,
            )
        )
        return 0
    say(f"simulating {args.pool} frames of {SHAPE[0]}x{SHAPE[1]} float32 ...")
    pool = _pool(args.pool, args.seed)
    accuracy = _accuracy(pool)
    say(f"recall {accuracy['recall']:.3f} precision {accuracy['precision']:.3f}")
    numpy_rates, numpy_cpu_ms = _numpy_passes(pool, args.frames, args.repeats)
    base = statistics.median(numpy_rates)
    say(f"numpy: {base:.1f} frames/s")
    results: list[dict[str, Any]] = [
        {
            "mode": "numpy",
            "workers": 1,
            "frames_per_s": round(base, 2),
            "frames_per_s_per_core": round(base, 2),
            "passes": [round(r, 2) for r in numpy_rates],
            "cpu_ms_per_frame": round(numpy_cpu_ms, 3),
        }
    ]
    efficiency: dict[str, float] = {}
    scaling: dict[str, float] = {}
    cpu_scaling: dict[str, float] = {}
    counts = sorted(set(counts))
    passes = _dask_passes(pool, counts, args.frames, args.repeats, say)
    first = passes[counts[0]]
    for n in counts:
        p = passes[n]
        fps = statistics.median(p["rates"])
        efficiency[str(n)] = round(fps / (n * base), 3)
        # in-run ratios: pass by pass against the smallest count's pass of the same round
        scaling[str(n)] = round(
            statistics.median(
                (a / n) / (b / counts[0]) for a, b in zip(p["rates"], first["rates"], strict=True)
            ),
            3,
        )
        cpu_scaling[str(n)] = round(
            statistics.median(
                b / a for a, b in zip(p["worker_cpu_ms"], first["worker_cpu_ms"], strict=True)
            ),
            3,
        )
        worker_cpu = statistics.median(p["worker_cpu_ms"])
        sender_ms = statistics.median(
            c * 1e3 / r for c, r in zip(p["sender"], p["rates"], strict=True)
        )
        results.append(
            {
                "mode": "dask",
                "workers": n,
                "frames_per_s": round(fps, 2),
                "frames_per_s_per_core": round(fps / n, 2),
                "efficiency": efficiency[str(n)],
                "scaling_efficiency": scaling[str(n)],
                "cpu_scaling_efficiency": cpu_scaling[str(n)],
                "passes": [round(r, 2) for r in p["rates"]],
                "sender_cpu_cores": round(statistics.median(p["sender"]), 3),
                "worker_cpu_cores": round(statistics.median(p["cores"]), 3),
                "worker_analysis_ms_p50": round(statistics.median(p["analysis_ms"]), 2),
                "cpu_ms_per_frame": round(worker_cpu, 3),
                "sender_cpu_ms_per_frame": round(sender_ms, 3),
                "cpu_efficiency": round(numpy_cpu_ms / worker_cpu, 3),
            }
        )
        say(f"dask x{n}: {fps:.1f} frames/s, scaling efficiency {scaling[str(n)]:.2f}")
    out = {
        "results": results,
        "scaling_ceiling": _scaling_ceiling(results, os.cpu_count() or 1),
        "finders": finders,
        "recall": round(accuracy["recall"], 4),
        "precision": round(accuracy["precision"], 4),
        "hit_accuracy": round(accuracy["hit_accuracy"], 4),
        "true_peaks": accuracy["true_peaks"],
        "efficiency": efficiency,
        "scaling_efficiency": scaling,
        "cpu_scaling_efficiency": cpu_scaling,
        "frame_bytes": SHAPE[0] * SHAPE[1] * 4,
        "frames_per_pass": args.frames,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "targets": {"frames_per_s_per_core": TARGET_FPS_PER_CORE, "efficiency": TARGET_EFFICIENCY},
        "meets_targets": {
            "frames_per_s_per_core": min(r["frames_per_s_per_core"] for r in results)
            >= TARGET_FPS_PER_CORE,
            "efficiency": all(e >= TARGET_EFFICIENCY for e in efficiency.values()),
            "scaling_efficiency": all(e >= TARGET_EFFICIENCY for e in scaling.values()),
            "recall_precision": accuracy["recall"] >= 0.95 and accuracy["precision"] >= 0.95,
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
