"""Shared dashboard data: ONE monitor subscription + analysis per stream, shared by every viewer.

The dashboard service (``widgets.dashboard_service``) keeps one :class:`Dashboard` per process. A
:class:`ProjectFeed` per project lists the project's DSN channels with a ``stream.read`` token
(minted by a ``token_source``, renewed when a third of its life is left) and runs one
:class:`StreamMonitor` per channel: a :class:`beamhub.streaming.consumer.StreamConsumer` on the channel's
``monitor`` (PUB fan-out) endpoint, an :class:`beamhub.streaming.analysis.Analyzer` and a
:class:`beamhub.streaming.analysis.RunningStats`, in one background thread. Page requests only read the
latest snapshot, so a hundred viewers cost what one does.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from beamhub.widgets.live_image import FrameLog, Tile, steering_events, viewport_tile

__all__ = [
    "Dashboard",
    "ProjectFeed",
    "StreamMonitor",
    "TokenSource",
    "downsample",
    "shown_info",
]

log = logging.getLogger("beamhub.dashboard")

#: How many recent hits a monitor keeps at full resolution (a page may hold one to inspect it).
HITS_KEPT = 16
#: project -> (token, exp as a UNIX time); raises if the project cannot be served.
TokenSource = Callable[[str], tuple[str, float]]


def downsample(image: np.ndarray, max_px: int) -> tuple[np.ndarray, int]:
    """Block-max ``image`` so neither side exceeds ``max_px``; returns (small image, block)."""
    h, w = image.shape[:2]
    block = max(1, -(-max(h, w) // max_px))
    if block == 1:
        return np.asarray(image, dtype=np.float32), 1
    hb, wb = -(-h // block), -(-w // block)
    padded = np.zeros((hb * block, wb * block), dtype=np.float32)
    padded[:h, :w] = image
    return padded.reshape(hb, block, wb, block).max(axis=(1, 3)), block


def _scaled(image: np.ndarray) -> list[int]:
    """0..255 on a log scale (detector images span decades), flattened bottom row first (the
    order of bokeh's image glyph, whose y axis points up) for JSON."""
    img = np.log1p(np.clip(np.nan_to_num(image), 0, None))
    if img.size:
        lo, hi = np.percentile(img, [1.0, 99.9])
        if hi <= lo:
            lo, hi = float(img.min()), float(img.max())
        img = np.clip((img - lo) * (255.0 / max(float(hi - lo), 1e-9)), 0, 255)
    return np.flipud(img).astype(np.uint8).ravel().tolist()


def shown_info(result: Any, t: float, shape: tuple[int, ...]) -> dict[str, Any]:
    """What the image shows: which frame, when, hit or not, and its peaks (pixel row/column)."""
    return {
        "seq": result.seq,
        "run": result.run,
        "time_unix": round(t, 3),
        "hit": bool(result.hit),
        "n_peaks": result.n_peaks,
        "height": int(shape[0]),
        "width": int(shape[1]),
        "peaks_row": [round(float(p[0]), 2) for p in result.peaks],
        "peaks_col": [round(float(p[1]), 2) for p in result.peaks],
    }


class StreamMonitor:
    """One channel's monitor subscription, analysed in a background thread; snapshots for pages."""

    #: StreamConsumers open right now in this process, by channel id (what status reports).
    open_consumers: dict[str, int] = {}
    _open_lock = threading.Lock()

    @classmethod
    def _count(cls, channel_id: str, delta: int) -> None:
        with cls._open_lock:
            n = cls.open_consumers.get(channel_id, 0) + delta
            if n:
                cls.open_consumers[channel_id] = n
            else:
                cls.open_consumers.pop(channel_id, None)

    def __init__(
        self,
        channel: dict[str, Any],
        *,
        history: int = 600,
        sample_s: float = 0.5,
        image_px: int = 96,
        params: dict[str, Any] | None = None,
        register: Callable[[str], Any] | None = None,
        frame_log_keep: int = 200_000,
    ) -> None:
        endpoints = channel.get("endpoints") or {}
        #: consumer id -> a registered CURVE credential on this channel (every DSN channel is CURVE)
        self.register = register
        if not endpoints.get("monitor"):
            raise ValueError(f"channel {channel.get('id')!r} has no monitor endpoint")
        self.channel = channel
        self.channel_id: str = channel["id"]
        self.stream: str = channel.get("stream", "")
        self.project: str = channel.get("project", "")
        self.sample_s = sample_s
        self.image_px = image_px
        self.params = params
        self.state = "starting"
        self.error: str | None = None
        self.started_at = time.monotonic()
        self.frames_analysed = 0
        #: per-frame hit/peaks figures and runs, for the run table and its export
        self.frame_log = FrameLog(keep=frame_log_keep)
        #: the last hit (frame, result, UNIX time) at full resolution: its tiles are what the
        #: image shows; before any hit, the latest frame
        self.last_hit: tuple[Any, Any, float] | None = None
        self.latest: tuple[Any, Any, float] | None = None
        #: the last hits by frame number, so a page holding one can still zoom into it
        self.hits: dict[int, tuple[Any, Any, float]] = {}
        self._last_frame = time.monotonic()
        self._series: deque[tuple[float, float, float]] = deque(maxlen=history)
        self._snap: dict[str, Any] = self._base()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"dashboard-{self.channel_id}", daemon=True
        )

    def start(self) -> StreamMonitor:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def snapshot(self) -> dict[str, Any]:
        """The latest figures (built by the monitor thread every ``sample_s``; never blocks)."""
        snap = dict(self._snap)
        snap["state"], snap["error"] = self.state, self.error
        idle = time.monotonic() - self._last_frame > 3 * self.sample_s + 1
        snap["note"] = (
            "waiting for frames: a stream flows while its analysis (a work consumer) reads it"
            if self.state == "running" and idle
            else None
        )
        return snap

    def shown(self) -> tuple[Any, Any, float] | None:
        """What the image shows: the last hit, or the latest frame while there was none."""
        return self.last_hit or self.latest

    def tile(self, seq: int | None = None, **viewport: Any) -> tuple[Tile, dict[str, Any]]:
        """A viewport tile of the shown frame (or of the kept hit ``seq``) and what it is;
        LookupError before any frame or for a hit no longer kept."""
        shown = self.shown() if seq is None else self.hits.get(seq)
        if shown is None and seq is not None:
            raise LookupError(
                f"seq: hit {seq} of {self.channel_id} is no longer kept (the last "
                f"{HITS_KEPT} hits are); release the held image"
            )
        if shown is None:
            raise LookupError(f"no frame of {self.channel_id} analysed yet")
        frame, result, t = shown
        return viewport_tile(frame.data, **viewport), shown_info(result, t, frame.data.shape)

    def _base(self) -> dict[str, Any]:
        return {
            "channel": self.channel_id,
            "stream": self.stream,
            "project": self.project,
            "frames_analysed": 0,
            "hit_rate": 0.0,
            "peaks_per_frame": 0.0,
            "frames_lost": 0,
            "malformed": 0,
            "restarts": 0,
            "latency_p50_ms": None,
            "latency_p99_ms": None,
            "rate_hz": 0.0,
            "last_seq": None,
            "source_rev": None,
            "series": {"t": [], "hit_rate": [], "peaks_per_frame": []},
            "radial_profile": [],
            "image": None,
            "peaks": {"x": [], "y": []},
            "shown": None,
            "runs": [],
            "run_events": [],
        }

    def _run(self) -> None:
        from beamhub.streaming.analysis import Analyzer, RunningStats
        from beamhub.streaming.consumer import ChannelLookupError, StreamConsumer

        endpoints = self.channel["endpoints"]
        try:
            analyzer = Analyzer(self.params, worker="dashboard")
            consumer_id = f"dashboard-{os.uname().nodename}-{os.getpid()}-{self.channel_id}"
            curve: dict[str, Any] = {}
            if endpoints.get("server_key"):
                if self.register is None:
                    raise ValueError(
                        "the channel needs a registered consumer key and this dashboard "
                        "cannot register one (no DSN token)"
                    )
                cred = self.register(consumer_id)  # the dashboard's own key, made here
                curve = {
                    "curve_server_key": cred.server_key,
                    "curve_keypair": (cred.public, cred.secret),
                }
            consumer = StreamConsumer(
                endpoints["monitor"],
                monitor=True,
                report=endpoints.get("report"),
                consumer_id=consumer_id,
                log=log,
                **curve,
            )
        except (ValueError, ChannelLookupError) as exc:
            self.state, self.error = "error", str(exc)
            log.warning("dashboard cannot subscribe to %s: %s", self.channel_id, exc)
            return
        self._count(self.channel_id, +1)
        stats = RunningStats(window=100)
        latency: deque[float] = deque(maxlen=1000)
        last = None
        next_sample = time.monotonic()
        frames_at_sample, t_at_sample = 0, time.monotonic()
        self.state = "running"
        try:
            while not self._stop.is_set():
                frame = consumer.receive(timeout=0.1)
                if frame is not None:
                    result = analyzer.analyse(frame)
                    stats.add(result)
                    latency.append(result.latency_s * 1e3)
                    self.frames_analysed = stats.frames
                    self._last_frame = time.monotonic()
                    last = (frame, result)
                    now_unix = time.time()
                    self.frame_log.add(result, now_unix)
                    if frame.data.ndim == 2:
                        self.latest = (frame, result, now_unix)
                        if result.hit:
                            self.last_hit = self.latest
                            self.hits[result.seq] = self.latest
                            while len(self.hits) > HITS_KEPT:
                                del self.hits[next(iter(self.hits))]
                now = time.monotonic()
                if now < next_sample:
                    continue
                rate = (stats.frames - frames_at_sample) / max(1e-6, now - t_at_sample)
                frames_at_sample, t_at_sample = stats.frames, now
                next_sample = now + self.sample_s
                if last is not None:  # the image of the last frame; the arrays are copied here
                    self._snap = self._build(consumer, stats, latency, last, rate)
        except Exception as exc:  # the page shows why this stream stopped
            self.state, self.error = "error", f"{type(exc).__name__}: {exc}"
            log.exception("dashboard monitor of %s failed", self.channel_id)
        finally:
            consumer.close()
            self._count(self.channel_id, -1)
            if self.state != "error":
                self.state = "stopped"

    def _build(
        self, consumer: Any, stats: Any, latency: deque[float], last: tuple[Any, Any], rate: float
    ) -> dict[str, Any]:
        frame, result = last
        snap = stats.snapshot()
        self._series.append((time.time() * 1e3, snap["hit_rate"], snap["peaks_per_frame"]))
        t, hit, peaks = (list(c) for c in zip(*self._series, strict=True))
        lat = np.fromiter(latency, dtype=float) if latency else None
        image = None
        peaks_xy: dict[str, list[float]] = {"x": [], "y": []}
        if frame.data.ndim == 2:
            small, block = downsample(frame.data, self.image_px)
            h, w = frame.data.shape
            image = {
                "data": _scaled(small),
                "rows": small.shape[0],
                "cols": small.shape[1],
                "height": h,
                "width": w,
                "block": block,
            }
            if result.n_peaks:
                peaks_xy = {
                    "x": [round(float(p[1]) + 0.5, 2) for p in result.peaks],
                    "y": [round(h - float(p[0]) - 0.5, 2) for p in result.peaks],
                }
        profile = stats.radial_profile
        shown = self.shown()
        return {
            **self._base(),
            "frames_analysed": stats.frames,
            "hits": stats.hits,
            "hit_rate": round(snap["hit_rate"], 4),
            "peaks_per_frame": round(snap["peaks_per_frame"], 3),
            "frames_lost": consumer.lost,
            "malformed": consumer.malformed,
            "restarts": consumer.restarts,
            "rate_hz": round(rate, 2),
            "latency_p50_ms": None if lat is None else round(float(np.percentile(lat, 50)), 2),
            "latency_p99_ms": None if lat is None else round(float(np.percentile(lat, 99)), 2),
            "last_seq": frame.header.seq,
            "source_rev": frame.header.rev,
            "last_n_peaks": result.n_peaks,
            "last_hit": bool(result.hit),
            "series": {"t": t, "hit_rate": hit, "peaks_per_frame": peaks},
            "radial_profile": [] if profile is None else np.round(profile, 3).tolist(),
            "image": image,
            "peaks": peaks_xy,
            "shown": None if shown is None else shown_info(shown[1], shown[2], shown[0].data.shape),
            "runs": self.frame_log.runs(),
            "run_events": self.frame_log.run_events(),
        }


class ProjectFeed:
    """A project's channels on the DSN, each with one :class:`StreamMonitor`; rediscovered often."""

    def __init__(
        self,
        project: str,
        dsn_url: str,
        token_source: TokenSource,
        *,
        discover_s: float = 2.0,
        monitor_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.project = project
        self.dsn_url = dsn_url.rstrip("/")
        self.token_source = token_source
        self.discover_s = discover_s
        self.monitor_kwargs = monitor_kwargs or {}
        self.monitors: dict[str, StreamMonitor] = {}
        self.dsn_viewers: dict[str, int | None] = {}
        #: the source's current steering values per channel (read-only here; viewers watch them)
        self.source_params: dict[str, dict[str, Any]] = {}
        self.source_units: dict[str, dict[str, str]] = {}  # channel -> parameter -> units
        self.error: str | None = None
        self.discoveries = 0
        self._token: tuple[str, float, float] | None = None  # token, exp, issued (local clock)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"dashboard-feed-{project}", daemon=True
        )

    def start(self) -> ProjectFeed:
        self._thread.start()
        return self

    def wait_discovered(self, timeout: float) -> bool:
        """True once the first channel listing finished (successfully or not)."""
        return self._ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        with self._lock:
            monitors, self.monitors = list(self.monitors.values()), {}
        for monitor in monitors:
            monitor.stop()

    def _register(self, channel_id: str, consumer_id: str) -> Any:
        """Register a fresh consumer key of this dashboard on one channel (stream.read)."""
        from beamhub.streaming.credentials import register_key

        return register_key(
            self.dsn_url, channel_id, self.token(), "consumer", consumer_id=consumer_id
        )

    def token(self) -> str:
        """A ``stream.read`` token for the project, renewed when a third of its life is left."""
        now = time.time()
        if self._token is None or now > self._token[1] - (self._token[1] - self._token[2]) / 3:
            token, exp = self.token_source(self.project)
            self._token = (token, float(exp), now)
        return self._token[0]

    def _get(self, path: str) -> Any:
        req = urllib.request.Request(  # noqa: S310 - the deployment's own DSN URL
            self.dsn_url + path, headers={"Authorization": f"Bearer {self.token()}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return json.load(resp)

    def discover(self) -> None:
        """List the project's channels; subscribe to new ones, drop gone ones, restart failed."""
        try:
            channels = self._get("/api/channels")["channels"]
        except urllib.error.HTTPError as exc:
            detail = exc.read(300).decode("utf-8", "replace")
            if exc.code == 401:
                self._token = None  # revoked or expired: mint a fresh one next time
            self.error = f"the DSN refused to list {self.project}'s channels ({exc.code}): {detail}"
            return
        except (OSError, ValueError, KeyError) as exc:
            self.error = f"cannot list {self.project}'s channels at {self.dsn_url}: {exc}"
            return
        self.error = None
        wanted = {c["id"]: c for c in channels if (c.get("endpoints") or {}).get("monitor")}
        with self._lock:
            gone = [m for cid, m in self.monitors.items() if cid not in wanted]
            failed = [
                m
                for m in self.monitors.values()
                if m.state == "error" and time.monotonic() - m.started_at > 10
            ]
            for m in gone + failed:
                self.monitors.pop(m.channel_id, None)
            for cid, channel in wanted.items():
                if cid not in self.monitors:
                    register = functools.partial(self._register, cid)
                    self.monitors[cid] = StreamMonitor(
                        channel, register=register, **self.monitor_kwargs
                    ).start()
                    log.info(
                        "dashboard subscribed to %s (project %s, stream %s)",
                        cid,
                        self.project,
                        channel.get("stream"),
                    )
        for m in gone + failed:
            m.stop()
        for cid, channel in wanted.items():
            try:
                stats = self._get(f"/api/channels/{cid}").get("stats", {})
                self.dsn_viewers[cid] = (stats.get("monitor") or {}).get("viewers")
                if (channel.get("params") or {}).get("source_control"):
                    status = self._get(f"/api/channels/{cid}/steer/params")
                    if cid not in self.source_units:
                        schema = self._get(f"/api/channels/{cid}/steer/schema")
                        self.source_units[cid] = {
                            p["name"]: p.get("units") or "" for p in schema.get("params", [])
                        }
                    self.source_params[cid] = {
                        "rev": status.get("rev"),
                        "values": status.get("values") or {},
                        "units": self.source_units[cid],
                        "changes": status.get("changes") or [],
                    }
            except (OSError, ValueError) as exc:
                log.debug("no stats or source parameters for %s: %s", cid, exc)
        for table in (self.dsn_viewers, self.source_params, self.source_units):
            for cid in set(table) - set(wanted):
                table.pop(cid, None)
        self.discoveries += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.discover()
            except Exception as exc:  # keep serving the streams we have
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("dashboard discovery for %s failed", self.project)
            self._ready.set()
            self._stop.wait(self.discover_s)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            monitors = sorted(self.monitors.values(), key=lambda m: (m.stream, m.channel_id))
        streams = []
        for m in monitors:
            snap, source = m.snapshot(), self.source_params.get(m.channel_id)
            # steering changes and run starts/stops, with who: the source's log; a source
            # without a control endpoint: the run boundaries seen in the frames
            changes = source["changes"] if source else snap.pop("run_events", [])
            snap.pop("run_events", None)
            snap["events"] = steering_events(changes, (source or {}).get("units"))
            streams.append({**snap, "source": source})
        return {"project": self.project, "error": self.error, "streams": streams}

    def monitor(self, channel_id: str) -> StreamMonitor:
        """The monitor of one channel; KeyError naming the channels otherwise."""
        with self._lock:
            found = self.monitors.get(channel_id)
            known = sorted(self.monitors)
        if found is None:
            raise KeyError(
                f"channel: {channel_id!r} is not a live stream of {self.project} {known}"
            )
        return found

    def status(self) -> dict[str, Any]:
        with self._lock:
            monitors = list(self.monitors.values())
        return {
            "error": self.error,
            "subscriptions": len(monitors),
            "channels": {
                m.channel_id: {
                    "stream": m.stream,
                    "state": m.state,
                    "error": m.error,
                    "consumers_open": StreamMonitor.open_consumers.get(m.channel_id, 0),
                    "frames_analysed": m.frames_analysed,
                    "dsn_monitor_viewers": self.dsn_viewers.get(m.channel_id),
                }
                for m in monitors
            },
        }


class Dashboard:
    """Every project's feed in this process, started on the first view, plus who is watching."""

    def __init__(
        self,
        dsn_url: str,
        token_source: TokenSource,
        *,
        discover_s: float = 2.0,
        viewer_timeout_s: float = 10.0,
        idle_stop_s: float = 600.0,
        monitor_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.dsn_url = dsn_url
        self.token_source = token_source
        self.discover_s = discover_s
        self.viewer_timeout_s = viewer_timeout_s
        self.idle_stop_s = idle_stop_s
        self.monitor_kwargs = monitor_kwargs or {}
        self.feeds: dict[str, ProjectFeed] = {}
        self.pinned: set[str] = set()
        self._viewers: dict[str, dict[str, tuple[str, float]]] = {}  # project -> id -> (user, t)
        self._last_view: dict[str, float] = {}
        self._lock = threading.Lock()

    def feed(self, project: str, *, pin: bool = False) -> ProjectFeed:
        """The project's feed, started if needed (``pin``: never stopped for lack of viewers)."""
        with self._lock:
            if pin:
                self.pinned.add(project)
            self._last_view.setdefault(project, time.monotonic())
            feed = self.feeds.get(project)
            if feed is None:
                feed = ProjectFeed(
                    project,
                    self.dsn_url,
                    self.token_source,
                    discover_s=self.discover_s,
                    monitor_kwargs=self.monitor_kwargs,
                ).start()
                self.feeds[project] = feed
        return feed

    def touch(self, project: str, viewer_id: str, user: str) -> None:
        """Record that ``user``'s page ``viewer_id`` is showing ``project`` now."""
        now = time.monotonic()
        with self._lock:
            self._viewers.setdefault(project, {})[viewer_id[:64]] = (user, now)
            self._last_view[project] = now

    def viewers(self, project: str) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            table = self._viewers.get(project, {})
            for vid in [v for v, (_, t) in table.items() if now - t > self.viewer_timeout_s]:
                del table[vid]
            return {"pages": len(table), "users": sorted({u for u, _ in table.values()})}

    def reap(self) -> list[str]:
        """Stop feeds nobody looked at for ``idle_stop_s`` (unless pinned); returns their names."""
        now = time.monotonic()
        with self._lock:
            idle = [
                p
                for p in self.feeds
                if p not in self.pinned
                and self.idle_stop_s > 0
                and now - self._last_view.get(p, now) > self.idle_stop_s
            ]
            feeds = [self.feeds.pop(p) for p in idle]
        for feed in feeds:
            feed.stop()
            log.info(
                "dashboard unsubscribed from project %s: no viewer for %.0fs",
                feed.project,
                self.idle_stop_s,
            )
        return idle

    def status(self, projects: set[str] | None = None) -> dict[str, Any]:
        """Subscriptions and viewers per project (all projects when ``projects`` is None)."""
        with self._lock:
            feeds = dict(self.feeds)
        out = {}
        for name, feed in sorted(feeds.items()):
            if projects is None or name in projects:
                out[name] = {
                    **feed.status(),
                    "viewers": self.viewers(name),
                    "pinned": name in self.pinned,
                }
        return {
            "projects": out,
            "subscriptions_total": sum(f.status()["subscriptions"] for f in feeds.values()),
            "pid": os.getpid(),
        }

    def close(self) -> None:
        with self._lock:
            feeds, self.feeds = list(self.feeds.values()), {}
        for feed in feeds:
            feed.stop()
