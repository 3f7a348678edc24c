"""The analysis job of a beamtime unit: N workers on a channel's work stream, one peak finder.

Started by `beamhub beamtime apply`/`open` as a scheduler job (``python -m
beamhub.hub.beamtime.analysis --channel ch-... --workers N --finder JSON --until EPOCH``) with
``BEAMHUB_DSN_URL`` and ``BEAMHUB_TOKEN`` in its environment. Each worker thread is a work
consumer (the DSN shares the frames out among them) running
:func:`beamhub.streaming.analysis.analyse_stream`; the results fold into one
:class:`~beamhub.streaming.analysis.RunningStats`. Every ``--every`` seconds and at the end it
prints one JSON line: frames, hits, hit rate, lost frames; it ends at ``--until`` (the window's
end) or after ``--max-frames``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m beamhub.hub.beamtime.analysis", description=__doc__)
    p.add_argument("--channel", required=True, help="channel id (ch-...) or stream name")
    p.add_argument("--workers", type=int, default=1, help="work consumers (default 1)")
    p.add_argument("--finder", default="{}", help="peak finder parameters as JSON")
    p.add_argument("--until", type=float, default=None, help="stop at this epoch time")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--every", type=float, default=5.0, help="seconds between summary lines")
    return p


def _summary(stats: Any, lost: int, workers: int) -> dict[str, Any]:
    return {
        "time": time.time(),
        "workers": workers,
        "frames": stats.frames,
        "hits": stats.hits,
        "hit_rate": round(stats.hit_rate, 4) if stats.frames else None,
        "lost": lost,
    }


def main(argv: list[str] | None = None) -> int:
    from beamhub.streaming.analysis import Analyzer, RunningStats, analyse_stream
    from beamhub.streaming.consumer import StreamConsumer

    args = _parser().parse_args(argv)
    dsn, token = os.environ.get("BEAMHUB_DSN_URL"), os.environ.get("BEAMHUB_TOKEN")
    if not dsn or not token:
        print("analysis: BEAMHUB_DSN_URL and BEAMHUB_TOKEN must be set", file=sys.stderr)
        return 2
    analyzer = Analyzer(json.loads(args.finder))
    stats = RunningStats()
    lock = threading.Lock()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    consumers = [
        StreamConsumer.from_dsn(dsn, args.channel, token, consumer_id=f"beamtime-{os.getpid()}-{i}")
        for i in range(max(1, args.workers))
    ]
    done = [0]

    def on_result(result: Any) -> None:
        with lock:
            stats.add(result)
            done[0] += 1
            if args.max_frames is not None and done[0] >= args.max_frames:
                stop.set()

    threads = [
        threading.Thread(
            target=analyse_stream, args=(c, analyzer, on_result), kwargs={"stop": stop}, daemon=True
        )
        for c in consumers
    ]
    for t in threads:
        t.start()
    next_line = time.monotonic() + args.every
    try:
        while not stop.is_set():
            if args.until is not None and time.time() >= args.until:
                break
            stop.wait(0.2)
            if time.monotonic() >= next_line:
                with lock:
                    line = _summary(stats, sum(c.lost for c in consumers), len(consumers))
                print(json.dumps(line), flush=True)
                next_line += args.every
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
        with lock:
            line = _summary(stats, sum(c.lost for c in consumers), len(consumers))
        line["final"] = True
        print(json.dumps(line), flush=True)
        for c in consumers:
            c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
