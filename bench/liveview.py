"""LiveView iopub traffic: a real ipykernel shows a LiveView fed at 120 Hz; count what leaves it.

A kernel is started with jupyter_client (the same ipykernel a notebook server runs). One cell builds
a pool of simulated 1024x1024 frames with their analysis results, displays a
:class:`beamhub.widgets.liveview.LiveView` and starts a thread that feeds it ``rate_hz`` results per second
(with the frames, so the image path runs) for ``seconds``; the cell returns, as in a notebook, and
the kernel's IOLoop applies the throttled updates. This process reads every iopub message and
reports messages/s and bytes/s (peak over jupyter_server's 3 s window, as its rate limiter counts:
all messages except status/comm_open/execute_input; bytes of ``stream`` messages only) against
jupyter_server's defaults (1000 msg/s, 1e6 B/s), plus whether the limiter would have warned.

    python -m bench.liveview --json       (also part of `beamhub bench steer`)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import sys
import time
from typing import Any

__all__ = [
    "IOPUB_DATA_RATE_LIMIT",
    "IOPUB_MSG_RATE_LIMIT",
    "RATE_LIMIT_WINDOW_S",
    "iopub_rates",
    "measure_liveview",
    "run_in_kernel",
]

#: jupyter_server's ZMQChannelsWebsocketConnection defaults (checked in jupyter_server 2.21).
IOPUB_MSG_RATE_LIMIT = 1000.0
IOPUB_DATA_RATE_LIMIT = 1_000_000.0
RATE_LIMIT_WINDOW_S = 3.0
UNCOUNTED = {"status", "comm_open", "execute_input"}

DRIVE_CELL = """
import threading, time
from dataclasses import replace
from IPython.display import display
from beamhub.streaming.analysis import Analyzer
from beamhub.streaming.simulator import SimulatedDetector
from beamhub.streaming.wire import Frame, FrameHeader
from beamhub.widgets.liveview import LiveView

_det = SimulatedDetector((1024, 1024), seed=1)
_an = Analyzer()
_pool = []
for _i in range(24):
    _data, _meta = _det.generate()
    _pool.append(Frame(FrameHeader(stream="bench", seq=_i, dtype=_data.dtype.str,
                                   shape=_data.shape, meta=_meta), _data))
_results = [_an.analyse(_f) for _f in _pool]
view = LiveView(max_hz={max_hz})
if {naive}:  # the baseline: every figure updated on every frame, one patch per change
    import contextlib
    view.bokeh.batch = contextlib.nullcontext
    view._request_flush = view.flush
display(view)
_drive_done = threading.Event()

def _drive(n={n}, rate={rate}):
    t0 = time.monotonic()
    for i in range(n):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        k = i % len(_pool)
        view.feed(replace(_results[k], seq=i, latency_s=0.005), _pool[k])
    _drive_done.set()

_cpu0, _wall0 = time.process_time(), time.monotonic()  # the kernel's CPU while it streams
threading.Thread(target=_drive, daemon=True).start()
if {zoom_hz} and hasattr(view, "request_view"):  # a person zooming in and out on the image
    def _zoom(n=int({zoom_hz} * {n} / {rate})):
        for j in range(n):
            time.sleep(1.0 / {zoom_hz})
            s = 1024 >> (j % 4)
            view.request_view(x0=0, x1=s, y0=0, y1=s, px=380)
    threading.Thread(target=_zoom, daemon=True).start()
"""

REPORT_CELL = """
import json, threading, time
_drive_done.wait(60)
_cpu, _wall = time.process_time() - _cpu0, time.monotonic() - _wall0
view.stop()
print(json.dumps({"updates": view.updates, "results_seen": view.results_seen,
                  "comm_messages": view.bokeh.messages_sent, "comm_bytes": view.bokeh.bytes_sent,
                  "flush_thread": view.last_flush_thread,
                  "main_thread": threading.main_thread().name,
                  "last_t": view.series_source.data["t"][-1:],
                  "frames_shown": view.stats.frames,
                  "kernel_cpu_s": _cpu, "kernel_wall_s": _wall}))
"""


def _msg_bytes(msg: dict[str, Any]) -> int:
    if "_bytes" in msg:  # as received on the websocket
        return msg["_bytes"]
    parts = (msg.get("header"), msg.get("parent_header"), msg.get("metadata"), msg.get("content"))
    size = sum(len(json.dumps(p, default=str)) for p in parts)
    return size + sum(len(b) for b in msg.get("buffers") or ())


def iopub_rates(
    messages: list[tuple[float, str, int]], window_s: float = RATE_LIMIT_WINDOW_S
) -> dict[str, Any]:
    """Peak msg/s and stream-B/s over any ``window_s`` window, as jupyter_server counts them."""
    counted = [(t, kind, n) for t, kind, n in messages if kind not in UNCOUNTED]
    peak_msgs = peak_bytes = 0.0
    start = 0
    msgs = stream_bytes = 0
    for t, kind, n in counted:
        msgs += 1
        stream_bytes += n if kind == "stream" else 0
        while counted[start][0] < t - window_s:
            msgs -= 1
            stream_bytes -= counted[start][2] if counted[start][1] == "stream" else 0
            start += 1
        peak_msgs = max(peak_msgs, msgs / window_s)
        peak_bytes = max(peak_bytes, stream_bytes / window_s)
    return {
        "peak_msgs_per_s": round(peak_msgs, 1),
        "peak_stream_bytes_per_s": round(peak_bytes),
        "would_warn": peak_msgs > IOPUB_MSG_RATE_LIMIT or peak_bytes > IOPUB_DATA_RATE_LIMIT,
    }


def run_in_kernel(
    cells: list[str], collect_s: float, timeout: float = 120.0, cwd: str | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Execute ``cells`` in a fresh ipykernel; iopub messages (with arrival times) and outputs."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=cwd or os.getcwd(), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    kc = km.client()
    kc.start_channels()
    messages: list[dict[str, Any]] = []
    outputs: list[str] = []
    try:
        kc.wait_for_ready(timeout=60)
        deadline = time.monotonic() + timeout
        for index, code in enumerate(cells):
            msg_id = kc.execute(code)
            idle = False
            until = None
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cell {index} did not finish within {timeout} s")
                try:
                    msg = kc.get_iopub_msg(timeout=0.2)
                except queue.Empty:
                    if until is not None and time.monotonic() >= until:
                        break
                    continue
                msg["_t"] = time.monotonic()
                messages.append(msg)
                kind = msg["header"]["msg_type"]
                if kind == "stream":
                    outputs.append(msg["content"]["text"])
                if kind == "error":
                    raise RuntimeError("kernel error: " + "\n".join(msg["content"]["traceback"]))
                msg["_cell"] = index
                if (
                    kind == "status"
                    and msg["parent_header"].get("msg_id") == msg_id
                    and msg["content"]["execution_state"] == "idle"
                ):
                    idle = msg["_idle"] = True
                if idle and until is None:  # the first cell keeps the kernel busy afterwards
                    until = time.monotonic() + (collect_s if index == 0 else 0.3)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return messages, outputs


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _decode_ws(data: str | bytes) -> dict[str, Any]:
    """A kernel message from jupyter_server's websocket (JSON text or its binary framing)."""
    if isinstance(data, str):
        msg = json.loads(data)
    else:
        import struct

        nbufs = struct.unpack("!I", data[:4])[0]
        offsets = struct.unpack("!" + "I" * nbufs, data[4 : 4 + 4 * nbufs])
        end = offsets[1] if nbufs > 1 else len(data)
        msg = json.loads(data[offsets[0] : end])
    msg["_bytes"] = len(data)
    return msg


async def _run_via_server(
    cells: list[str], collect_s: float, timeout: float
) -> tuple[list[dict[str, Any]], list[str]]:
    import secrets
    import subprocess
    import tempfile
    import uuid

    from tornado.httpclient import AsyncHTTPClient, HTTPRequest
    from tornado.websocket import websocket_connect

    token, port = secrets.token_hex(16), _free_port()
    base = f"127.0.0.1:{port}"
    headers = {"Authorization": f"token {token}"}
    root = tempfile.mkdtemp(prefix="beamhub-bench-liveview-")
    server = subprocess.Popen(  # the notebook server a user's browser talks to, default limits
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            "--allow-root",
            f"--IdentityProvider.token={token}",
            "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={root}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    http = AsyncHTTPClient()
    messages: list[dict[str, Any]] = []
    outputs: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                resp = await http.fetch(
                    f"http://{base}/api/status", headers=headers, raise_error=False
                )
                if resp.code == 200:
                    break
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"jupyter_server did not answer on {base} within 60 s")
            await asyncio.sleep(0.2)
        resp = await http.fetch(
            f"http://{base}/api/kernels",
            method="POST",
            headers=headers,
            body=json.dumps({"name": "python3"}),
        )
        kernel = json.loads(resp.body)["id"]
        ws = await websocket_connect(
            HTTPRequest(
                f"ws://{base}/api/kernels/{kernel}/channels?session_id={uuid.uuid4().hex}",
                headers=headers,
            )
        )
        session = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        for index, code in enumerate(cells):
            msg_id = uuid.uuid4().hex
            ws.write_message(
                json.dumps(
                    {
                        "header": {
                            "msg_id": msg_id,
                            "username": "bench",
                            "session": session,
                            "msg_type": "execute_request",
                            "version": "5.3",
                        },
                        "parent_header": {},
                        "metadata": {},
                        "channel": "shell",
                        "buffers": [],
                        "content": {
                            "code": code,
                            "silent": False,
                            "store_history": False,
                            "user_expressions": {},
                            "allow_stdin": False,
                            "stop_on_error": True,
                        },
                    }
                )
            )
            until = None
            while True:
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(f"cell {index} did not finish within {timeout} s")
                if until is not None and now >= until:
                    break
                wait = min(0.2, (until or deadline) - now)
                try:
                    data = await asyncio.wait_for(ws.read_message(), wait)
                except TimeoutError:
                    continue
                if data is None:
                    raise RuntimeError("the kernel websocket closed")
                msg = _decode_ws(data)
                if msg.get("channel") != "iopub":
                    continue
                msg["_t"] = time.monotonic()
                messages.append(msg)
                kind = msg["header"]["msg_type"]
                if kind == "stream":
                    outputs.append(msg["content"]["text"])
                if kind == "error":
                    raise RuntimeError("kernel error: " + "\n".join(msg["content"]["traceback"]))
                msg["_cell"] = index
                if (
                    kind == "status"
                    and msg["parent_header"].get("msg_id") == msg_id
                    and msg["content"]["execution_state"] == "idle"
                    and until is None
                ):
                    msg["_idle"] = True
                    until = time.monotonic() + (collect_s if index == 0 else 0.3)
        ws.close()
        await http.fetch(
            f"http://{base}/api/kernels/{kernel}",
            method="DELETE",
            headers=headers,
            raise_error=False,
        )
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
    return messages, outputs


def measure_liveview(
    seconds: float = 10.0,
    rate_hz: float = 120.0,
    max_hz: float = 10.0,
    *,
    via: str = "kernel",
    naive: bool = False,
    zoom_hz: float = 0.0,
) -> dict[str, Any]:
    """Run a LiveView fed at ``rate_hz``; its iopub traffic while it streams.

    ``via="kernel"``: a kernel started with jupyter_client, messages read from iopub directly.
    ``via="server"``: a real ``jupyter_server`` (default rate limits) and its kernel websocket,
    so its own "IOPub message rate exceeded" warnings are seen if they happen. ``naive=True``:
    the baseline, every figure patched on every frame from the feeding thread. ``zoom_hz``:
    a person changing the image's zoom that often (each change asks for a viewport tile).
    Kernel CPU is the kernel process's CPU time over the feeding phase, as cores used.
    """
    n = int(seconds * rate_hz)
    cells = [
        DRIVE_CELL.format(max_hz=max_hz, n=n, rate=rate_hz, naive=naive, zoom_hz=zoom_hz),
        REPORT_CELL,
    ]
    if via == "server":
        messages, outputs = asyncio.run(_run_via_server(cells, seconds + 1.0, 180.0))
    elif via == "kernel":
        messages, outputs = run_in_kernel(cells, collect_s=seconds + 1.0)
    else:
        raise ValueError(f"via: {via!r} must be 'kernel' or 'server'")
    report = json.loads(
        [line for line in "".join(outputs).splitlines() if line.startswith("{")][-1]
    )
    # the feeding phase: after the first cell returned, before the next one starts (no cell
    # runs, so no idle status resets the server's counters)
    first_idle = next(i for i, m in enumerate(messages) if m.get("_idle") and m["_cell"] == 0)
    during = [m for m in messages[first_idle + 1 :] if m["_cell"] == 0]
    rows = [(m["_t"], m["header"]["msg_type"], _msg_bytes(m)) for m in during]
    span = (rows[-1][0] - rows[0][0]) if len(rows) > 1 else 1.0
    comm = [r for r in rows if r[1] == "comm_msg"]
    warnings = [
        m
        for m in messages
        if m["header"]["msg_type"] == "stream" and "rate exceeded" in m["content"]["text"]
    ]
    return {
        "via": via,
        "naive": naive,
        "input_rate_hz": rate_hz,
        "max_hz": max_hz,
        "seconds": seconds,
        "results_fed": report["results_seen"],
        "updates": report["updates"],
        "updates_per_s": round(report["updates"] / seconds, 2),
        "iopub_msgs": len(rows),
        "iopub_msgs_per_s": round(len(rows) / span, 1),
        "iopub_bytes_per_s": round(sum(r[2] for r in rows) / span),
        "comm_msgs_per_update": round(len(comm) / max(1, report["updates"]), 2),
        **iopub_rates(rows),
        "limits": {
            "iopub_msg_rate_limit": IOPUB_MSG_RATE_LIMIT,
            "iopub_data_rate_limit": IOPUB_DATA_RATE_LIMIT,
            "rate_limit_window_s": RATE_LIMIT_WINDOW_S,
        },
        "server_rate_warnings": len(warnings) if via == "server" else None,
        "zoom_hz": zoom_hz,
        "kernel_cpu_cores": round(report["kernel_cpu_s"] / max(1e-9, report["kernel_wall_s"]), 3),
        "flushed_on": report["flush_thread"],
        "kernel_main_thread": report["main_thread"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.liveview", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", action="store_true", help="one line of JSON")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate-hz", type=float, default=120.0)
    parser.add_argument("--max-hz", type=float, default=10.0)
    parser.add_argument("--via", choices=("server", "kernel"), default="server")
    parser.add_argument("--naive", action="store_true", help="the unthrottled baseline")
    parser.add_argument(
        "--zoom-hz", type=float, default=0.0, help="image zoom changes per second (0: none)"
    )
    args = parser.parse_args(argv)
    out = measure_liveview(
        args.seconds,
        args.rate_hz,
        args.max_hz,
        via=args.via,
        naive=args.naive,
        zoom_hz=args.zoom_hz,
    )
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
