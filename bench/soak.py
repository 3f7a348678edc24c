"""Soak: a real `beamhub up` streaming 4 MiB frames at 120 Hz through L7 for N minutes, analysed.

One run starts `beamhub up` on a temporary state dir with the detector at ``--rate`` Hz of
``--shape`` float32 frames (default 1024x1024 = 4 MiB) into its L7 channel, attaches the Dask
analysis (2 single-threaded workers pulling from the lossless work stream) and a logged-in
viewer (vera) polling the shared dashboard's data API, and runs for ``--minutes``. Every
``--sample`` seconds it samples RSS, open fds and CPU time of every process of the stack
(supervisor, services, alice-less: no user server here, Dask workers, this process).

Reported: frames lost in the work stream (sequence holes across the workers' results; target 0),
the analysed rate against the detector's, per process the RSS and fd growth after the warm-up
(the first minute, or ``--warmup``; target ≤ 50 MB RSS and flat fds), and each process's share
of the CPU. If the stack does not carry the rate (analysed < 95 % of it), the output says so
with the achieved rate and where the time goes: CPU per process and, when ``py-spy`` is
installed, a profile of the busiest process. Nothing is hidden: ``--rate`` and ``--shape``
measure what the machine does carry.

    beamhub bench soak --json [--minutes 10] [--rate 120] [--shape 1024,1024]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from beamhub.bench._upstack import (
    DashboardViewer,
    SeqAnalysis,
    UpStack,
    dev_yaml,
    say,
    stack_processes,
    wait_for,
)

__all__ = ["main"]

RSS_GROWTH_TARGET_MB = 50.0
#: fds "flat": at most this many more after the warm-up (sockets come and go with traffic)
FD_GROWTH_TARGET = 10
CARRY_FRACTION = 0.95


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beamhub bench soak", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the JSON document only")
    p.add_argument("--minutes", type=float, default=10.0, help="how long to stream (10)")
    p.add_argument("--rate", type=float, default=120.0, help="detector frames per second (120)")
    p.add_argument("--shape", default="1024,1024", help="frame shape, float32 (1024,1024)")
    p.add_argument("--workers", type=int, default=2, help="Dask analysis workers (2)")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between samples (5)")
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of warm-up (default 60, or 1/3 of a run shorter than 3 minutes)",
    )
    p.add_argument("--profile-s", type=float, default=10.0, help="py-spy seconds when missed")
    p.add_argument("--keep", action="store_true", help="keep the temporary state dir (logs)")
    return p


class Sampler:
    """RSS, fds and CPU seconds of named processes; a name keeps its series across restarts."""

    def __init__(self) -> None:
        self.series: dict[str, list[dict[str, float]]] = {}
        self.pids: dict[str, set[int]] = {}

    def sample(self, procs: dict[int, str], t: float) -> None:
        import psutil

        for pid, name in procs.items():
            try:
                p = psutil.Process(pid)
                with p.oneshot():
                    cpu = p.cpu_times()
                    point = {
                        "t": t,
                        "pid": pid,
                        "rss_mb": p.memory_info().rss / 2**20,
                        "fds": p.num_fds(),
                        "cpu_s": cpu.user + cpu.system,
                    }
            except psutil.Error:
                continue
            self.series.setdefault(name, []).append(point)
            self.pids.setdefault(name, set()).add(pid)

    def report(self, warmup_t: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, points in sorted(self.series.items()):
            after = [p for p in points if p["t"] >= warmup_t]
            if len(after) < 2:
                continue
            first, last = after[:3], after[-3:]  # medians of three: one sample is noise
            rss0 = statistics.median(p["rss_mb"] for p in first)
            rss1 = statistics.median(p["rss_mb"] for p in last)
            fd0 = statistics.median(p["fds"] for p in first)
            fd1 = statistics.median(p["fds"] for p in last)
            same = [p for p in after if p["pid"] == after[-1]["pid"]]
            span = same[-1]["t"] - same[0]["t"]
            cpu = (same[-1]["cpu_s"] - same[0]["cpu_s"]) / span if span > 0 else 0.0
            out[name] = {
                "pids": sorted(self.pids[name]),
                "rss_mb_after_warmup": round(rss0, 1),
                "rss_mb_end": round(rss1, 1),
                "rss_growth_mb": round(rss1 - rss0, 1),
                "rss_mb_max": round(max(p["rss_mb"] for p in after), 1),
                "fds_after_warmup": fd0,
                "fds_end": fd1,
                "fd_growth": fd1 - fd0,
                "cpu_cores": round(cpu, 3),
                "met": rss1 - rss0 <= RSS_GROWTH_TARGET_MB and fd1 - fd0 <= FD_GROWTH_TARGET,
            }
        return out


def _profile(pid: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """py-spy record of ``pid`` for ``seconds``: the top functions by own samples."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {"error": "py-spy is not installed (pip install py-spy) — no profile"}
    out = workdir / f"profile-{pid}.txt"
    cmd = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--format", "raw"]
    cmd += ["--output", str(out), "--nonblocking"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        return {"error": "py-spy did not finish"}
    if done.returncode != 0 or not out.exists():
        return {"error": f"py-spy failed: {(done.stderr or done.stdout)[-300:]}"}
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n

    def top(d: dict[str, int], k: int = 12) -> list[dict[str, Any]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:k]
        return [{"function": f, "share": round(n / total, 3)} for f, n in ranked]

    return {"samples": total, "self": top(own), "inclusive": top(inclusive, 15)}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    duration = args.minutes * 60
    warmup = args.warmup if args.warmup is not None else (60.0 if duration >= 180 else duration / 3)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    stack = UpStack(dev_yaml(args.rate, shape, revocation_poll=5.0), keep=args.keep)
    analysis: SeqAnalysis | None = None
    viewer: DashboardViewer | None = None
    load0 = os.getloadavg()
    try:
        say(f"soak: starting beamhub up in {stack.dir} ({args.rate:g} Hz of {shape} float32)")
        stack.start()
        stack.login("alice", "alice-dev")  # she exists in the hub once she has logged in
        token = stack.project_token(stack.user_api_token("alice"), ["stream.read"])
        channel = stack.detector_channel()
        info = stack.channel_info(token)
        say(
            f"soak: channel {channel} mode {info.get('mode') or info.get('params', {}).get('mode')}"
        )
        analysis = SeqAnalysis(stack.urls["dsn"], channel, token, args.workers).start()
        board = stack.public + "/services/dashboard/"
        vera = stack.login("vera", "vera-dev")
        vera.get(board, timeout=30)  # the dashboard's OAuth with the hub: a login cookie
        viewer = DashboardViewer(vera, board + "p/p-1001/data.json").start()
        if wait_for(lambda: analysis.frames > 10, 60) is None:
            raise RuntimeError("the analysis saw no frames within 60 s")
        dask_pids = analysis.worker_pids()
        sampler = Sampler()
        t0 = time.monotonic()
        f0 = analysis.frames
        ch0 = _channel_stats(stack, token)
        say(f"soak: streaming for {args.minutes:g} min; warm-up {warmup:.0f} s")
        next_say = t0 + 60
        while (now := time.monotonic()) - t0 < duration:
            procs = stack_processes(stack.state)
            for i, (_addr, pid) in enumerate(sorted(analysis.worker_pids().items())):
                procs[pid] = f"dask-worker-{i}"
            procs[os.getpid()] = "bench (dask scheduler, collector)"
            sampler.sample(procs, now - t0)
            if now >= next_say:
                rate = (analysis.frames - f0) / (now - t0)
                say(
                    f"soak: {(now - t0) / 60:.0f} min: {analysis.frames - f0} frames analysed "
                    f"({rate:.1f}/s), {len(procs)} processes"
                )
                next_say += 60
            time.sleep(max(0.0, args.sample - (time.monotonic() - now)))
        elapsed = time.monotonic() - t0
        frames = analysis.frames - f0
        ch1 = _channel_stats(stack, token)
        busiest = _busiest(sampler, warmup)
        analysed_rate = frames / elapsed
        carried = analysed_rate >= CARRY_FRACTION * args.rate
        profile = None
        if not carried and busiest is not None:
            say(f"soak: missed the rate; profiling {busiest[0]} (pid {busiest[1]}) with py-spy")
            profile = {"process": busiest[0], "pid": busiest[1]}
            profile.update(_profile(busiest[1], args.profile_s, stack.dir))
        summaries = analysis.stop()
        epoch = max(range(len(analysis.epochs)), key=lambda e: len(analysis.epochs[e]))
        seen = analysis.epochs[epoch]
        lost = analysis.missing(epoch, min(seen) - 1, None) if seen else 0
        procs = sampler.report(warmup)
        doc = {
            "benchmark": "soak",
            "config": {
                "minutes": args.minutes,
                "rate_hz": args.rate,
                "shape": list(shape),
                "frame_mib": round(4 * shape[0] * shape[1] / 2**20, 2),
                "mode": "l7",
                "dask_workers": args.workers,
                "dashboard_viewer_hz": 2.0,
                "sample_s": args.sample,
                "warmup_s": warmup,
            },
            "targets": {
                "frames_lost": 0,
                "rss_growth_mb": f"<= {RSS_GROWTH_TARGET_MB:g}",
                "fd_growth": f"<= {FD_GROWTH_TARGET} (flat)",
                "rate": f">= {CARRY_FRACTION:.0%} of {args.rate:g} Hz analysed",
            },
            "frames": {
                "analysed": frames,
                "analysed_per_s": round(analysed_rate, 1),
                "lost": lost,
                "seq_range": [min(seen), max(seen)] if seen else None,
                "epochs": len(analysis.epochs),
                "dsn_channel": {"start": ch0, "end": ch1},
                "consumers": [s.get("consumer", s) for s in summaries],
            },
            "carried": carried,
            "baseline_rate_hz": args.rate,
            "rate_ratio": round(analysed_rate / args.rate, 3),
            "dashboard": {"answers": viewer.ok, "failed": viewer.failed},
            "processes": procs,
            "where_time_goes": {
                name: p["cpu_cores"]
                for name, p in sorted(procs.items(), key=lambda kv: -kv[1]["cpu_cores"])
            },
            "profile": profile,
            "met": {
                "frames_lost_0": lost == 0,
                "rss_flat": all(p["rss_growth_mb"] <= RSS_GROWTH_TARGET_MB for p in procs.values()),
                "fds_flat": all(p["fd_growth"] <= FD_GROWTH_TARGET for p in procs.values()),
                "rate_carried": carried,
            },
            "machine": {
                "cpus": os.cpu_count(),
                "load_start": [round(x, 2) for x in load0],
                "load_end": [round(x, 2) for x in os.getloadavg()],
                "dask_worker_pids": dask_pids,
            },
        }
        if not carried:
            doc["note"] = (
                f"this machine did not carry {args.rate:g} Hz of {shape} frames with the analysis: "
                f"{analysed_rate:.1f} frames/s analysed ({analysed_rate / args.rate:.0%}); "
                "where_time_goes lists CPU cores per process and profile the busiest one. "
                "Try --rate or --shape for what it carries."
            )
    except KeyboardInterrupt:
        say("soak: interrupted; stopping everything")
        _stop(viewer, analysis, stack)
        return 130
    except BaseException:
        stack.keep = True
        say(f"soak: failed; the stack's output is in {stack.out_path}")
        _stop(viewer, analysis, stack)
        raise
    _stop(viewer, analysis, stack)
    print(json.dumps(doc, indent=None if args.json else 2))
    return 0


def _channel_stats(stack: UpStack, token: str) -> dict[str, Any] | None:
    """The DSN's counters of the detector channel (frames in, out, drops by reason)."""
    with contextlib.suppress(Exception):
        stats = stack.channel_info(token).get("stats") or {}
        keep = ("head_seq", "messages_in", "messages_out", "drops", "rate_hz", "unaccounted")
        return {k: stats.get(k) for k in keep if k in stats} or stats
    return None


def _busiest(sampler: Sampler, warmup: float) -> tuple[str, int] | None:
    report = sampler.report(warmup)
    if not report:
        return None
    name = max(report, key=lambda n: report[n]["cpu_cores"])
    return name, int(sampler.series[name][-1]["pid"])


def _stop(viewer: Any, analysis: Any, stack: UpStack) -> None:
    if viewer is not None:
        viewer.stop()
    if analysis is not None:
        try:
            analysis.stop()
        except Exception as exc:  # stopping must go on
            say(f"soak: stopping the analysis: {exc}")
    stack.stop()


if __name__ == "__main__":
    sys.exit(main())
