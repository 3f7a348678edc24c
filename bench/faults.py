"""The fault table: kill -9 each part of a real `beamhub up` during a 120 Hz stream, one at a time.

One run starts `beamhub up` on a temporary state dir (detector at ``--rate`` Hz, frames of
``--shape``), attaches the Dask analysis (2 single-threaded workers, each pulling from the
detector channel's lossless work stream), logs alice in through the real IdP and spawns her
server, and sends gateway requests all along so that audit records are written. It first
measures a window with no fault (the baseline), then kills, one at a time and each once the
stack has recovered from the one before: DSN, gateway, token service, dashboard, IdP,
JupyterHub, proxy, detector, alice's server and one Dask worker. Per fault:

* ``back_s``: seconds from the kill until the service answers its own probe again (a new pid in
  ``status.json`` and its health URL; the detector: frames of its new run analysed; alice's
  server: the hub noticed, and it answers again once she starts it from the hub's API);
* ``frames_lost``: sequence numbers no worker analysed, between this kill and the next (holes
  in the union of every worker's results), with the reason (``dsn_restart`` when the workers'
  consumers saw the DSN link drop, ``worker_lost`` for the Dask worker, else ``gap``);
* ``user_servers_lost``: alice's server is no longer the same process or does not answer
  through the proxy once the stack is back (the row that kills it reports it, by design);
* ``audit_lost``: answers the gateway gave (each audited before it is sent) minus the records
  of the traffic's token in ``audit.jsonl``; ``audit_verify``: `beamhub audit verify` passes.

Targets: every service back ≤ 10 s; 0 user servers lost; 0 audit records lost; a Dask worker
loss costs at most the frames it held (its receive queue, the DSN's queue for it, the results
it had not flushed and what the kernel's socket buffers hold). Progress goes to stderr, the
JSON document to stdout; Ctrl-C stops everything it started.

    beamhub bench faults --json [--only dsn,gateway] [--rate 120] [--shape 256,256]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from typing import Any

from beamhub.bench._upstack import (
    GatewayTraffic,
    SeqAnalysis,
    UpStack,
    answers,
    audit_records,
    audit_verify,
    dev_yaml,
    say,
    wait_for,
)

__all__ = ["FAULTS", "main"]

#: In the order they are killed: alice's server, a Dask worker and the detector last (after them
#: a server is re-spawned, one worker carries the stream, a restarted detector streams anew).
FAULTS = (
    "dsn",
    "gateway",
    "tokens",
    "dashboard",
    "idp",
    "hub",
    "proxy",
    "user_server",
    "dask_worker",
    "detector",
)
BACK_TARGET_S = 10.0
#: How long to wait for a service before the row says it never came back.
BACK_TIMEOUT_S = 60.0
USER, PASSWORD = "alice", "alice-dev"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="beamhub bench faults", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the JSON document only")
    p.add_argument(
        "--only", default="", help="comma-separated faults (default: all): " + ",".join(FAULTS)
    )
    p.add_argument("--rate", type=float, default=120.0, help="detector frames per second (120)")
    p.add_argument(
        "--shape", default="256,256", help="frame shape, default what `beamhub up` uses (256,256)"
    )
    p.add_argument("--workers", type=int, default=2, help="Dask analysis workers (2)")
    p.add_argument(
        "--settle", type=float, default=6.0, help="seconds of steady stream after each recovery"
    )
    p.add_argument("--baseline", type=float, default=15.0, help="seconds of the no-fault window")
    p.add_argument("--keep", action="store_true", help="keep the temporary state dir (logs)")
    return p


class FaultRun:
    """One stack, its load, and the measurements of each fault."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.shape = tuple(int(x) for x in args.shape.split(","))
        self.stack = UpStack(dev_yaml(args.rate, self.shape), keep=args.keep)
        self.analysis: SeqAnalysis | None = None
        self.traffic: GatewayTraffic | None = None
        self.rows: list[dict[str, Any]] = []
        self.marks: list[tuple[int, int]] = []  # (epoch, head seq) when each window began
        self.audit_lost_so_far = 0

    # --- set-up -----------------------------------------------------------------------------
    def start(self) -> None:
        st = self.stack
        say(f"faults: starting beamhub up in {st.dir} ...")
        t0 = time.monotonic()
        st.start()
        say(f"faults: beamhub up running in {time.monotonic() - t0:.1f} s; logging {USER} in")
        self.session = st.login(USER, PASSWORD)
        st.spawn(self.session, USER)
        self.api_token = st.user_api_token(USER)
        self.server_headers = {"Authorization": f"token {self.api_token}"}
        self.server_url = f"{st.public}/user/{USER}/api/status"
        self.server_pid = st.server_pid(USER)
        read = st.project_token(self.api_token, ["stream.read"])
        self.stream_token = read
        self.gateway_token = st.project_token(self.api_token, ["stream.read"])
        import jwt

        self.jti = jwt.decode(self.gateway_token, options={"verify_signature": False})["jti"]
        channel = st.detector_channel()
        info = st.channel_info(read)
        self.channel_hwm = int((info.get("params") or info).get("hwm") or 0)
        say(f"faults: {USER}'s server pid {self.server_pid}; analysis on channel {channel} ...")
        self.analysis = SeqAnalysis(st.urls["dsn"], channel, read, self.args.workers).start()
        self.traffic = GatewayTraffic(
            f"{st.public}/services/gateway/api/v1/whoami", self.gateway_token
        ).start()
        ok = wait_for(lambda: self.analysis.head()[1] > self.args.rate, 60)
        if ok is None:
            raise RuntimeError("the analysis saw no frames within 60 s")

    # --- probes -------------------------------------------------------------------------------
    def probe(self, name: str) -> bool:
        st, urls = self.stack, self.stack.urls
        if name == "idp":
            return answers(urls["idp"] + "/.well-known/openid-configuration")
        if name == "dsn":
            return answers(urls["dsn"] + "/api/health")
        if name in ("hub", "proxy"):
            return answers(st.hub + "api/")
        if name == "tokens":
            return answers(urls["tokens"] + "jwks.json")
        if name == "gateway":
            return answers(st.public + "/services/gateway/api/v1/status")
        if name == "dashboard":
            return answers(st.public + "/services/dashboard/api/health")
        raise ValueError(name)

    def detector_frames(self, channel: str) -> int:
        """Frames the DSN counted into ``channel`` (its stats' head_seq; 0 if none or unknown)."""
        import requests

        r = requests.get(
            f"{self.stack.urls['dsn']}/api/channels/{channel}",
            headers={"Authorization": f"Bearer {self.stream_token}"},
            timeout=5,
        )
        stats = r.json().get("stats") if r.ok else None
        return int((stats or {}).get("head_seq") or 0)

    def channel_drops(self) -> dict[str, Any] | None:
        """The DSN's drop counters of the analysed channel, by reason (cumulative)."""
        try:
            return self.stack.channel_info(self.stream_token).get("stats", {}).get("drops")
        except Exception:  # the DSN may be restarting: unknown, not zero
            return None

    def server_ok(self) -> bool:
        return answers(self.server_url, self.server_headers)

    # --- one fault ----------------------------------------------------------------------------
    def window_start(self) -> None:
        assert self.analysis is not None
        self.marks.append(self.analysis.head())

    def run_fault(self, name: str) -> dict[str, Any]:
        assert self.analysis is not None
        st, an = self.stack, self.analysis
        row: dict[str, Any] = {"fault": name}
        outages_before = _outages(an)
        self.window_start()
        if name in ("dsn", "gateway", "tokens", "dashboard", "idp", "hub", "proxy", "detector"):
            old = st.status()[name]
            restarts = old["restarts"]
            if name == "detector":
                an.new_epoch()
                channel = st.detector_channel()
            os.kill(old["pid"], signal.SIGKILL)
            t0 = time.monotonic()
            row["killed_pid"] = old["pid"]

            def back(n: str = name, pid: int = old["pid"]) -> bool:
                s = st.status()[n]
                if s["state"] != "running" or s["pid"] in (None, pid):
                    return False
                if n == "detector":  # streaming again: frames arrive in its channel
                    return self.detector_frames(st.detector_channel()) > 0
                return self.probe(n)

            ok = wait_for(back, BACK_TIMEOUT_S)
            row["back_s"] = None if ok is None else round(time.monotonic() - t0, 2)
            row["restarts"] = st.status()[name]["restarts"] - restarts
            row["probe"] = "health URL"
            if name == "detector":
                now = st.detector_channel()
                row["probe"] = "frames arrive in the channel of detector.json (DSN counters)"
                row["channel_kept"] = now == channel
                row["analysis_resumed"] = wait_for(lambda: len(an.epochs) > 1, 10) is not None
        elif name == "user_server":
            row.update(self._kill_server())
        elif name == "dask_worker":
            row.update(self._kill_worker())
        else:
            raise ValueError(f"--only: no fault {name!r}; choose from {', '.join(FAULTS)}")
        # the rest of the stack back too (a new proxy gets the routes), then a steady stretch
        for other in ("hub", "proxy", "gateway"):
            wait_for(lambda o=other: self.probe(o), BACK_TIMEOUT_S)
        wait_for(self.server_ok, 30)
        pid = st.server_pid(USER)
        if name == "user_server":
            self.server_pid = pid
            row["user_servers_lost"] = None  # the killed one is this row's fault, not a loss
        else:
            same, ok = pid == self.server_pid, self.server_ok()
            row["user_servers_lost"] = 0 if same and ok else 1
            row["user_server"] = {"same_pid": same, "answers": ok}
        time.sleep(self.args.settle)  # a steady stretch of stream before the next fault
        row["audit"] = self.audit_check()
        row["dsn_outages_seen"] = _outages(an) - outages_before
        row["dsn_drops"] = self.channel_drops()
        say(
            f"faults: {name}: back in {row.get('back_s')} s, user servers lost "
            f"{row['user_servers_lost']}, audit lost {row['audit']['lost']}"
        )
        return row

    def _kill_server(self) -> dict[str, Any]:
        """kill -9 alice's server; the hub notices; she starts it again from the hub's API."""
        import requests

        st = self.stack
        pid = st.server_pid(USER)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        gone = wait_for(
            lambda: not (st.user_model(USER)["servers"].get("") or {}).get("ready"), 120, 0.5
        )
        noticed = None if gone is None else round(time.monotonic() - t0, 2)
        t1 = time.monotonic()
        requests.post(f"{st.hub}api/users/{USER}/server", headers=st.admin, timeout=60)
        ok = wait_for(self.server_ok, BACK_TIMEOUT_S + 60, 0.2)
        return {
            "killed_pid": pid,
            "hub_noticed_s": noticed,
            "respawn_s": None if ok is None else round(time.monotonic() - t1, 2),
            "back_s": None if ok is None else round(time.monotonic() - t0, 2),
            "probe": "/user/alice/api/status through the proxy, after a restart from the hub API",
        }

    def _kill_worker(self) -> dict[str, Any]:
        """kill -9 the Dask worker of analysis task 0; its nanny starts a new one."""
        assert self.analysis is not None
        an = self.analysis
        pids = an.worker_pids()
        addr = an.task_workers()[0] or sorted(pids)[0]
        pid = pids[addr]
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()

        def back() -> bool:
            now = an.worker_pids()
            return len(now) == self.args.workers and pid not in now.values()

        ok = wait_for(back, BACK_TIMEOUT_S, 0.25)
        return {
            "killed_pid": pid,
            "back_s": None if ok is None else round(time.monotonic() - t0, 2),
            "probe": "the scheduler has all its workers again (the nanny restarted it)",
            "held_bound": self.held_bound(),
        }

    def held_bound(self) -> dict[str, int]:
        """What one work consumer can hold: the most a worker's loss may cost, by part."""
        frame = 4 * math.prod(self.shape) + 200
        kernel = 0
        for name in ("tcp_rmem", "tcp_wmem"):
            try:
                kernel += int(open(f"/proc/sys/net/ipv4/{name}").read().split()[-1])
            except (OSError, ValueError, IndexError):
                pass
        parts = {
            "consumer_rcvhwm": 16,  # StreamConsumer's default hwm
            "dsn_queue": self.channel_hwm,
            "unflushed_results": math.ceil(self.args.rate * 0.1) + 1,  # flush_interval_s = 0.1
            "socket_buffers": math.ceil(kernel / frame),
        }
        parts["total"] = sum(parts.values())
        return parts

    def audit_check(self) -> dict[str, Any]:
        assert self.traffic is not None
        acked = self.traffic.acked  # before reading: every acked record is in the file by now
        recorded = audit_records(self.stack.state / "audit.jsonl", self.jti)
        lost_total = max(0, acked - recorded)
        lost = lost_total - self.audit_lost_so_far
        self.audit_lost_so_far = lost_total
        verify = audit_verify(self.stack.state / "audit.jsonl")
        return {
            "acked": acked,
            "recorded": recorded,
            "lost": lost,
            "verify_ok": bool(verify.get("ok")) and verify["exit"] == 0,
            "verify": {k: verify.get(k) for k in ("records", "torn_tails", "reason")},
        }

    # --- the end -------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Stop the load, count the holes per window, judge each row."""
        assert self.analysis is not None and self.traffic is not None
        time.sleep(2)
        self.window_start()  # the end of the last window
        self.traffic.stop()
        summaries = self.analysis.stop()
        an = self.analysis
        lost = []
        for (e0, h0), (e1, h1) in zip(self.marks, self.marks[1:], strict=False):
            if e0 == e1:
                lost.append(an.missing(e0, h0, h1))
            else:
                n = an.missing(e0, h0, None) + an.missing(e1, -1, h1)
                n += sum(an.missing(e, -1, None) for e in range(e0 + 1, e1))
                lost.append(n)
        for row, n in zip(self.rows, lost, strict=False):
            row["frames_lost"] = n
            if row["fault"] == "dask_worker":
                row["frames_lost_reason"] = {"worker_lost": n} if n else {}
            elif n and row.get("dsn_outages_seen"):
                row["frames_lost_reason"] = {"dsn_restart": n}
            else:
                row["frames_lost_reason"] = {"gap": n} if n else {}
            row["targets"] = _judge(row)
            row["met"] = all(v == "met" for v in row["targets"].values())
        consumers = [s.get("consumer", {}) for s in summaries]
        return {
            "frames_analysed": an.frames,
            "epochs": len(an.epochs),
            "analysis_error": an.error,
            "consumers": [
                {k: c.get(k) for k in ("frames", "lost_reasons", "disconnects", "restarts")}
                for c in consumers
            ]
            or summaries,
            "gateway_requests": {"acked": self.traffic.acked, "other": self.traffic.other},
        }

    def stop(self) -> None:
        if self.traffic is not None:
            self.traffic.stop()
        if self.analysis is not None:
            try:
                self.analysis.stop()
            except Exception as exc:  # stopping must go on
                say(f"faults: stopping the analysis: {exc}")
        self.stack.stop()


def _outages(an: SeqAnalysis) -> int:
    return sum(len(v) for v in an.session.outages.values())


def _judge(row: dict[str, Any]) -> dict[str, str]:
    t: dict[str, str] = {}
    if row["fault"] == "baseline":
        t["frames_lost_0"] = "met" if row["frames_lost"] == 0 else "missed"
    else:
        back = row.get("back_s")
        t["back_le_10s"] = "met" if back is not None and back <= BACK_TARGET_S else "missed"
    if row.get("user_servers_lost") is not None:
        t["user_servers_lost_0"] = "met" if row["user_servers_lost"] == 0 else "missed"
    t["audit_lost_0"] = "met" if row["audit"]["lost"] == 0 else "missed"
    t["audit_verify"] = "met" if row["audit"]["verify_ok"] else "missed"
    if row["fault"] == "dask_worker":
        bound = row["held_bound"]["total"]
        t["worker_loss_le_held"] = "met" if row["frames_lost"] <= bound else "missed"
    return t


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    faults = [f.strip() for f in args.only.split(",") if f.strip()] or list(FAULTS)
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        print(
            f"beamhub bench faults: no fault {', '.join(unknown)}; choose from {', '.join(FAULTS)}",
            file=sys.stderr,
        )
        return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    run = FaultRun(args)
    load0 = os.getloadavg()
    t_start = time.time()
    try:
        run.start()
        say(f"faults: baseline, {args.baseline:g} s without a fault ...")
        run.window_start()
        time.sleep(args.baseline)
        base = {"fault": "baseline", "window_s": args.baseline, "audit": run.audit_check()}
        base["user_servers_lost"] = 0 if run.server_ok() else 1
        base["dsn_drops"] = run.channel_drops()
        run.rows.append(base)
        for name in faults:
            say(f"faults: kill -9 {name} ...")
            run.rows.append(run.run_fault(name))
        totals = run.finish()
    except KeyboardInterrupt:
        say("faults: interrupted; stopping everything")
        run.stop()
        return 130
    except BaseException:
        say(f"faults: failed; the stack's output is in {run.stack.out_path}")
        run.args.keep = run.stack.keep = True
        run.stop()
        raise
    run.stop()
    rows = run.rows
    doc = {
        "benchmark": "faults",
        "config": {
            "rate_hz": args.rate,
            "shape": list(run.shape),
            "dask_workers": args.workers,
            "settle_s": args.settle,
            "faults": faults,
        },
        "targets": {
            "back_s": f"<= {BACK_TARGET_S:g}",
            "user_servers_lost": 0,
            "audit_records_lost": 0,
            "dask_worker_frames_lost": "<= frames it held (held_bound)",
        },
        "baseline": rows[0],
        "rows": rows[1:],
        "totals": totals,
        "met": all(r["met"] for r in rows),
        "missed": [
            f"{r['fault']}: {k}" for r in rows for k, v in r["targets"].items() if v != "met"
        ],
        "machine": {
            "cpus": os.cpu_count(),
            "load_start": [round(x, 2) for x in load0],
            "load_end": [round(x, 2) for x in os.getloadavg()],
            "duration_s": round(time.time() - t_start, 1),
        },
    }
    print(json.dumps(doc, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
