"""LiveView: live detector image, peaks, hit rate and radial profile in bokeh, throttled for Jupyter.

Frames arrive at 120 Hz or more; a browser needs a few updates per second and Jupyter drops iopub
traffic above ~1000 messages/s. So results are folded as they come (any thread, cheap) and the
figures are updated at most ``max_hz`` times per second (default 10; the image at ``image_hz``),
each update one bokeh PATCH-DOC (a handful of comm messages) applied on the kernel's IOLoop —
the only thread that touches the bokeh document. In a notebook::

    from beamhub.widgets import LiveView
    view = LiveView.from_dsn(channel="det")   # in the kernel: StreamConsumer + Analyzer thread
    view                                      # image + peaks, hit rate, peaks/frame, profile
    view.stop()

    view = LiveView.from_session(session)     # results of a streaming.analysis_dask session
                                              # (no frames reach the kernel: the image panel
                                              # shows the virtual powder pattern of the peaks)

``view.add_listener(fn)`` calls ``fn(result)`` for every frame result (a
:class:`beamhub.widgets.steering.SteeringPanel` uses it to time its round trips).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import ipywidgets as w
import numpy as np
from bokeh.layouts import column, row
from bokeh.models import (
    Checkbox,
    ColorBar,
    ColumnDataSource,
    Div,
    LabelSet,
    LinearColorMapper,
    Range1d,
    Select,
    Spinner,
)
from bokeh.plotting import figure
from bokeh.protocol import Protocol
from jupyter_bokeh import BokehModel
from tornado.ioloop import IOLoop

from beamhub.streaming.analysis import Analyzer, FrameResult, RunningStats
from beamhub.widgets.live_image import (
    PALETTES,
    FrameLog,
    Tile,
    steering_events,
    viewport_tile,
)

__all__ = ["LiveView", "downsample_max", "load_bokehjs"]

log = logging.getLogger("beamhub.widgets.liveview")


def downsample_max(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Max-pool a 2-D image so neither side exceeds ``size`` (peaks survive, unlike striding)."""
    h, w_ = image.shape
    f = max(1, math.ceil(max(h, w_) / size))
    if f == 1:
        return np.asarray(image, dtype=np.float32)
    h2, w2 = h // f, w_ // f
    rows = image[: h2 * f, : w2 * f].reshape(h2 * f, w2, f).max(axis=2)
    return rows.reshape(h2, f, w2).max(axis=1).astype(np.float32)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Scale to 0..255 between the 1st and 99.7th percentile: 1 byte/pixel on the wire."""
    finite = np.nan_to_num(image.astype(np.float32, copy=False))
    lo, hi = np.percentile(finite[:: max(1, finite.shape[0] // 64)], [1.0, 99.7])
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip((finite - lo) * scale, 0, 255).astype(np.uint8)


class _BatchedBokehModel(BokehModel):
    """BokehModel that sends all document events of one update as ONE PATCH-DOC, and counts."""

    def __init__(self, model: Any, **kwargs: Any) -> None:
        self._batch: list[Any] | None = None
        self.messages_sent = 0
        self.bytes_sent = 0
        super().__init__(model, **kwargs)

    def close(self) -> None:
        try:
            super().close()
        except KeyError:  # the document already forgot this model (interpreter shutdown)
            pass

    def _document_patched(self, event: Any) -> None:
        if event.setter is self:
            return
        if self._batch is not None:
            self._batch.append(event)
            return
        self._send_patch([event])

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        self._batch = []
        try:
            yield
        finally:
            events, self._batch = self._batch, None
            if events:
                self._send_patch(events)

    def _send_patch(self, events: list[Any]) -> None:
        # the same comm protocol as BokehModel._document_patched, for a list of events
        msg = Protocol().create("PATCH-DOC", events)
        self.send({"msg": "patch", "payload": msg.header_json})
        self.send({"msg": "patch", "payload": msg.metadata_json})
        self.send({"msg": "patch", "payload": msg.content_json})
        for buffer in msg.buffers:
            self.send({"msg": "patch", "payload": json.dumps(buffer.ref)})
            self.send({"msg": "patch"}, [buffer.to_bytes()])

    def send(self, content: Any, buffers: Any = None) -> None:
        self.messages_sent += 1
        self.bytes_sent += len(json.dumps(content)) + sum(len(b) for b in buffers or ())
        super().send(content, buffers)


class _LoopThread:
    """A private IOLoop on a daemon thread, for use outside a kernel (scripts, tests, services)."""

    def __init__(self) -> None:
        ready = threading.Event()
        self.loop: IOLoop | None = None

        def main() -> None:
            asyncio.set_event_loop(asyncio.new_event_loop())
            self.loop = IOLoop.current()
            ready.set()
            self.loop.start()
            self.loop.close(all_fds=False)

        self.thread = threading.Thread(target=main, name="liveview-loop", daemon=True)
        self.thread.start()
        ready.wait(10)

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.add_callback(self.loop.stop)
            self.thread.join(5)


def _kernel_loop() -> IOLoop | None:
    """The IOLoop running in this thread (a kernel's main loop when called from a cell)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None
    return IOLoop.current()


_BOKEHJS_LOADED = False
#: The run table is rewritten at most this often (a text change re-renders it in the browser).
RUNS_EVERY_S = 5.0


def load_bokehjs() -> None:
    """Put BokehJS in the notebook page once per kernel (jupyter_bokeh's views need it).

    INLINE resources: compute nodes and air-gapped facilities often cannot reach a CDN.
    """
    global _BOKEHJS_LOADED
    if _BOKEHJS_LOADED:
        return
    from bokeh.io import output_notebook
    from bokeh.resources import INLINE

    output_notebook(INLINE, hide_banner=True)
    _BOKEHJS_LOADED = True


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class LiveView(w.VBox):
    """Throttled bokeh figures of a stream's analysis; see the module docstring."""

    def __init__(
        self,
        *,
        max_hz: float = 10.0,
        image_hz: float = 2.0,
        image_size: int = 256,
        history: int = 600,
        stats: RunningStats | None = None,
        loop: IOLoop | None = None,
        title: str = "live analysis",
        **kwargs: Any,
    ) -> None:
        if not 0 < max_hz <= 60:
            raise ValueError(f"max_hz: {max_hz} must be in (0, 60] updates per second")
        if not 0 < image_hz <= max_hz:
            raise ValueError(f"image_hz: {image_hz} must be in (0, max_hz={max_hz}]")
        self.max_hz = float(max_hz)
        self.image_hz = float(image_hz)
        self.image_size = int(image_size)
        self.history = int(history)
        self.stats = stats or RunningStats()
        self._own_loop = None
        if loop is None:
            loop = _kernel_loop()
        if loop is None:
            self._own_loop = _LoopThread()
            loop = self._own_loop.loop
        self.loop = loop
        self.updates = 0  # document updates applied (each = one PATCH-DOC)
        self.last_flush_thread = ""  # diagnostics: the thread that last touched the document
        self.results_seen = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[FrameResult], Any]] = []
        self._flush_requested = False
        self._last_flush = 0.0
        self._last_image = 0.0
        self._last_slow = 0.0  # image (powder) and profile refresh at image_hz
        self._pending_image: tuple[np.ndarray, FrameResult, float] | None = None
        self.image_result: FrameResult | None = None  # the frame whose image is shown
        self._image_shape: tuple[int, int] | None = None
        #: the shown frame at full resolution (data, result, UNIX time): zooming cuts tiles of it
        self._shown: tuple[np.ndarray, FrameResult, float] | None = None
        self._any_hit = False
        self._view_dirty = False
        self._pending_view: tuple[float, float, float, float] | None = None
        self._setting_contrast = False  # set while the view writes the automatic limits
        self.contrast: tuple[float, float] | None = None  # None: automatic
        self.tile: Tile | None = None  # the last tile drawn
        #: per-frame hit/peaks figures by run (:meth:`export_csv`, :meth:`export_hdf5`)
        self.frame_log = FrameLog()
        self._changes: list[dict[str, Any]] = []  # the source's steering log (set_changes)
        self._units: dict[str, str] = {}
        self._events_shown: list[tuple[Any, ...]] = []
        self._changes_new = False
        self._runs_shown: list[dict[str, Any]] = []
        self._runs_at = 0.0
        self._latest: FrameResult | None = None
        self._latest_hit: FrameResult | None = None
        self._since_flush = [0, 0]  # frames, peaks since the last update
        self._t0 = time.monotonic()
        self._driver: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: str | None = None
        if _in_kernel():
            load_bokehjs()
        self._build(title)
        super().__init__([self.bokeh], **kwargs)

    # -- figures ---------------------------------------------------------------------------
    def _build(self, title: str) -> None:
        self.image_source = ColumnDataSource(
            {"image": [np.zeros((2, 2), np.uint8)], "x": [0], "y": [0], "dw": [1], "dh": [1]}
        )
        self.peaks_source = ColumnDataSource({"x": [], "y": []})
        self.series_source = ColumnDataSource({"t": [], "hit_rate": [], "peaks": []})
        self.profile_source = ColumnDataSource({"r": [], "intensity": []})
        self.events_source = ColumnDataSource(steering_events([]))
        # row 0 at the top, as detector software shows it; zoom/pan ask for a finer tile
        self.x_range, self.y_range = Range1d(0, 1), Range1d(1, 0)
        img = figure(
            title="detector image: what it shows is the 'image' above",
            width=420,
            height=400,
            x_range=self.x_range,
            y_range=self.y_range,
            tools="pan,wheel_zoom,box_zoom,reset",
            active_scroll="wheel_zoom",
            x_axis_label="column (px)",
            y_axis_label="row (px)",
        )
        self.image_figure = img
        # the tile arrives as 0..255 between the contrast limits (1 byte/pixel on the wire);
        # the colour bar's mapper carries the limits in detector counts
        self.pixel_mapper = LinearColorMapper(palette=PALETTES["Viridis256"], low=0, high=255)
        self.scale_mapper = LinearColorMapper(palette=PALETTES["Viridis256"], low=0, high=1)
        img.image(
            image="image",
            x="x",
            y="y",
            dw="dw",
            dh="dh",
            source=self.image_source,
            color_mapper=self.pixel_mapper,
        )
        img.add_layout(ColorBar(color_mapper=self.scale_mapper, width=10, title="counts"), "right")
        img.scatter(
            "x",
            "y",
            source=self.peaks_source,
            size=11,
            fill_alpha=0,
            line_color="#ff3030",
            line_width=1.5,
            marker="circle",
        )
        for rng in (self.x_range, self.y_range):
            rng.on_change("start", self._viewport_moved)
            rng.on_change("end", self._viewport_moved)
        self.palette_select = Select(
            title="colour map", value="Viridis256", options=list(PALETTES), width=110
        )
        self.auto_contrast = Checkbox(label="automatic contrast", active=True)
        self.contrast_low = Spinner(title="low (counts)", value=0.0, step=1.0, width=100)
        self.contrast_high = Spinner(title="high (counts)", value=1.0, step=1.0, width=100)
        self.palette_select.on_change("value", lambda _a, _o, new: self.set_palette(new))
        self.auto_contrast.on_change("active", self._contrast_changed)
        self.contrast_low.on_change("value", self._contrast_changed)
        self.contrast_high.on_change("value", self._contrast_changed)
        kw = {
            "width": 420,
            "height": 185,
            "x_axis_type": "datetime",
            "tools": "xpan,xwheel_zoom,reset",
        }
        rate = figure(title="hit rate / peaks per frame", x_axis_label="time (local)", **kw)
        rate.line(
            "t", "hit_rate", source=self.series_source, legend_label="hit rate", color="#d62728"
        )
        rate.line(
            "t",
            "peaks",
            source=self.series_source,
            legend_label="peaks/frame / 100",
            color="#1f77b4",
        )
        # steering changes and run starts/stops, with who: dashed lines and their labels
        rate.vspan(x="t", source=self.events_source, line_color="#7b3294", line_dash="dashed")
        rate.add_layout(
            LabelSet(
                x="t",
                y=4,
                y_units="screen",
                text="label",
                source=self.events_source,
                angle=1.5708,
                text_font_size="8pt",
                text_color="#7b3294",
                x_offset=-2,
            )
        )
        rate.legend.location = "top_left"
        rate.legend.orientation = "horizontal"
        rate.legend.background_fill_alpha = 0.6
        prof = figure(
            title="radial profile",
            width=420,
            height=185,
            x_axis_label="r (px)",
            tools="pan,wheel_zoom,reset",
        )
        prof.line("r", "intensity", source=self.profile_source, color="#2ca02c")
        self.image_shows = "waiting for a frame"
        self.title = title
        # fixed sizes: text that changes 10 times a second must not move what is around it
        # (a person clicking the steering panel above; its slider must stand still)
        self.info = Div(
            text=f"<b>{html.escape(title)}</b>: waiting for frames",
            width=860,
            height=56,
            styles={"overflow": "hidden"},
        )
        self.runs_div = Div(text="", width=860, height=110, styles={"overflow-y": "auto"})
        controls = row(
            self.palette_select, self.auto_contrast, self.contrast_low, self.contrast_high
        )
        self.bokeh = _BatchedBokehModel(
            column(self.info, row(column(controls, img), column(rate, prof)), self.runs_div)
        )

    # -- what the image shows (the loop's thread) -------------------------------------------
    def _viewport_moved(self, _attr: str, _old: Any, _new: Any) -> None:
        self._view_dirty = True
        self._request_flush()

    def _contrast_changed(self, attr: str, _old: Any, _new: Any) -> None:
        """A person typed a limit (manual from now on) or ticked automatic contrast."""
        if self._setting_contrast:
            return
        limits = None
        if attr == "value":  # a spinner: manual limits, if they make sense
            limits = self._manual_limits()
            if limits is None:
                return
            self._setting_contrast = True
            try:
                self.auto_contrast.active = False
            finally:
                self._setting_contrast = False
        elif not self.auto_contrast.active:
            limits = self._manual_limits()
        new = None if self.auto_contrast.active else limits
        if new == self.contrast:
            return
        self.contrast = new
        self._view_dirty = True
        self._request_flush()

    def _manual_limits(self) -> tuple[float, float] | None:
        low, high = self.contrast_low.value, self.contrast_high.value
        if low is None or high is None or not low < high:
            self.error = f"contrast: low {low} must be below high {high}"
            return None
        self.error = None
        return float(low), float(high)

    def set_contrast(self, low: float | None = None, high: float | None = None) -> None:
        """Fixed contrast limits in detector counts; no arguments: automatic (1st..99.9th pct)."""
        if (low is None) != (high is None):
            raise ValueError("low, high: give both contrast limits, or neither for automatic")
        if low is not None and high is not None and not float(low) < float(high):
            raise ValueError(f"low: {low} must be below high ({high})")

        def apply() -> None:
            self._setting_contrast = True
            try:
                self.auto_contrast.active = low is None
                if low is not None:
                    self.contrast_low.value, self.contrast_high.value = float(low), float(high)
            finally:
                self._setting_contrast = False
            self.contrast = None if low is None else (float(low), float(high))
            self._view_dirty = True
            self._request_flush()

        self.loop.add_callback(apply)

    def set_palette(self, name: str) -> None:
        """A colour map by name (``PALETTES``: Viridis256, Greys256, Inferno256, ...)."""
        if name not in PALETTES:
            raise ValueError(f"palette: {name!r} is not one of {', '.join(PALETTES)}")

        def apply() -> None:
            self.palette_select.value = name
            self.pixel_mapper.palette = self.scale_mapper.palette = PALETTES[name]

        self.loop.add_callback(apply)

    def request_view(self, *, x0: float, x1: float, y0: float, y1: float, px: int = 0) -> None:
        """Zoom the image to columns ``x0..x1`` and rows ``y0..y1`` (what wheel/box zoom do)."""
        if px:
            self.image_size = int(px)

        # applied by the next update, in its one document patch (with the tile it asks for)
        with self._lock:
            self._pending_view = (float(x0), float(x1), float(y0), float(y1))
        self._request_flush()

    def _draw_tile(self) -> Tile | None:
        """Cut the shown frame to the viewport at the plot's resolution; 1 byte per pixel."""
        if self._shown is None:
            return None
        data = self._shown[0]
        h, w_ = data.shape
        x0, x1 = self.x_range.start, self.x_range.end
        y0, y1 = sorted((self.y_range.start, self.y_range.end))
        try:
            tile = viewport_tile(data, x0=x0, x1=x1, y0=y0, y1=y1, px=self.image_size)
        except ValueError:  # panned off the detector: show the whole of it again
            tile = viewport_tile(data, x0=0, x1=w_, y0=0, y1=h, px=self.image_size)
        # automatic limits show on the colour bar only: the kernel never writes the spinners
        # per tile (a browser widget that re-formats a value would send it back, for ever)
        low, high = self.contrast or (tile.low, tile.high)
        scale = 255.0 / (high - low)
        pixels = np.clip((tile.data - low) * scale, 0, 255).astype(np.uint8)
        rows, cols = pixels.shape
        self.image_source.data = {
            "image": [pixels],
            "x": [tile.c0],
            "y": [tile.r0],
            "dw": [cols * tile.block],
            "dh": [rows * tile.block],
        }
        self.scale_mapper.update(low=low, high=high)
        self.tile = tile
        return tile

    # -- feeding (any thread) ---------------------------------------------------------------
    def add_listener(self, fn: Callable[[FrameResult], Any]) -> None:
        """Call ``fn(result)`` for each frame result (on the feeding thread; keep it short)."""
        self._listeners.append(fn)

    def feed(self, result: FrameResult, frame: Any = None, *, fold: bool = True) -> None:
        """One analysed frame (and optionally its :class:`~beamhub.streaming.wire.Frame` for the image)."""
        now = time.monotonic()
        image = None
        since = now - self._last_image
        # the image is the last hit (its peaks are what a person looks for), at most image_hz;
        # before the first hit, the latest frame at a third of that rate
        due = since >= 1.0 / self.image_hz and (
            result.hit or (not self._any_hit and since >= 3.0 / self.image_hz)
        )
        if frame is not None and due:
            data = np.asarray(frame.data)
            if data.ndim == 2:
                image = data  # a reference: tiles are cut on the loop when drawn
                self._last_image = now
        with self._lock:
            if fold:
                self.stats.add(result)
            self.frame_log.add(result)
            self.results_seen += 1
            self._latest = result
            if result.hit:
                self._latest_hit = result
            self._since_flush[0] += 1
            self._since_flush[1] += result.n_peaks
            if image is not None:
                self._any_hit = self._any_hit or bool(result.hit)
                self._pending_image = (image, result, time.time())
        for fn in self._listeners:
            try:
                fn(result)
            except Exception:  # a listener must not stop the stream
                log.exception("live view listener failed")
        self._request_flush()

    def set_changes(
        self, changes: list[dict[str, Any]], units: dict[str, str] | None = None
    ) -> None:
        """The source's steering log (``changes`` of its status: parameter changes, run
        starts/stops, who made them), marked on the time plot. Thread-safe."""
        with self._lock:
            self._changes = list(changes)
            self._changes_new = True
            if units is not None:
                self._units = dict(units)
        self._request_flush()

    def mark(self, kind: str, by: str, **fields: Any) -> None:
        """Mark one steering action now (``kind``: param with name/value, run_start, run_stop)."""
        with self._lock:
            self._changes.append({"t": time.time(), "kind": kind, "by": by, **fields})
            self._changes_new = True
        self._request_flush()

    def export_csv(self, path: str | os.PathLike[str], run: int | None = None) -> str:
        """Write the per-frame figures (of ``run``, or all) as CSV; returns the path."""
        with self._lock:
            text = self.frame_log.to_csv(run)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return os.fspath(path)

    def export_hdf5(self, path: str | os.PathLike[str], run: int | None = None) -> str:
        """Write the per-frame figures (of ``run``, or all) as HDF5 (``/frames/<column>``)."""
        with self._lock:
            body = self.frame_log.to_hdf5(run, {"title": self.title})
        with open(path, "wb") as f:
            f.write(body)
        return os.fspath(path)

    def _request_flush(self) -> None:
        """Coalesce: at most one update pending; it runs on the loop, >= 1/max_hz apart."""
        with self._lock:
            if self._flush_requested:
                return
            self._flush_requested = True
        self.loop.add_callback(self._schedule_flush)  # thread-safe in tornado

    def _schedule_flush(self) -> None:
        delay = self._last_flush + 1.0 / self.max_hz - time.monotonic()
        if delay > 0:
            self.loop.call_later(delay, self.flush)
        else:
            self.flush()

    # -- updating (the loop's thread only) --------------------------------------------------
    def flush(self) -> None:
        """Apply what arrived since the last update to the figures, as one document patch."""
        with self._lock:
            self._flush_requested = False
            self._last_flush = time.monotonic()
            snap = self.stats.snapshot()
            profile = snap["radial_profile"]
            profile = None if profile is None else np.array(profile)
            powder = None if snap["powder"] is None else np.array(snap["powder"])
            frames, peaks = self._since_flush
            self._since_flush = [0, 0]
            pending, self._pending_image = self._pending_image, None
            zoom, self._pending_view = self._pending_view, None
            latest, latest_hit = self._latest, self._latest_hit
            now = time.monotonic()
            slow_due = now - self._last_slow >= 1.0 / self.image_hz
            # markers and the run table change rarely: looked at with the slow figures
            changes = runs = None
            if slow_due or self._changes_new:
                # the source's steering log when a panel gave it; else the run boundaries seen
                changes = list(self._changes) or self.frame_log.run_events()
                self._changes_new = False
            if slow_due and now - self._runs_at >= RUNS_EVERY_S:
                runs = self.frame_log.runs()
                self._runs_at = now
            units = self._units
        with self.bokeh.batch():
            if frames:
                self.series_source.stream(
                    {
                        "t": [round(time.time() * 1e3)],
                        "hit_rate": [round(snap["hit_rate"], 4)],
                        "peaks": [round(peaks / frames / 100.0, 4)],
                    },
                    rollover=self.history,
                )
            overlay = None
            if pending is not None:
                h, w_ = pending[0].shape
                if self._image_shape is None:  # the first frame: fit the plot to the detector
                    self.x_range.update(start=0, end=w_)
                    self.y_range.update(start=h, end=0)
                self._image_shape = (h, w_)
                self._shown = pending
                overlay = self.image_result = pending[1]  # peaks found on the frame shown
            if zoom is not None:
                self.x_range.update(start=zoom[0], end=zoom[1])
                self.y_range.update(start=zoom[3], end=zoom[2])  # row 0 at the top
                self._view_dirty = True
            if pending is not None or self._view_dirty:
                self._view_dirty = False
                self._draw_tile()
            elif self._image_shape is None and powder is not None and slow_due:
                # no frames reach this process (Dask session): the virtual powder pattern,
                # with the latest hit's peaks on it
                b = self.stats.powder_bin
                self._set_image(
                    _to_uint8(powder.astype(np.float32)), (powder.shape[0] * b, powder.shape[1] * b)
                )
                overlay = latest_hit
            if overlay is not None:
                # say what is shown: a stale hit's circles must not pass for the current frame
                t = pending[2] if pending is not None else time.time()
                self.image_shows = _image_title(overlay, t, powder=pending is None)
                # (the figure's title stays: a title change re-lays out the whole figure)
                self.peaks_source.data = {
                    "x": overlay.peaks[:, 1].round(1).tolist(),
                    "y": overlay.peaks[:, 0].round(1).tolist(),
                }
            key = None if changes is None else [(c.get("t"), c.get("kind")) for c in changes]
            if key is not None and key != self._events_shown:
                self._events_shown = key
                self.events_source.data = steering_events(changes, units)
            if profile is not None and slow_due:
                self.profile_source.data = {
                    "r": list(range(len(profile))),
                    "intensity": np.round(profile, 2).tolist(),
                }
            if slow_due:
                self._last_slow = now
                if runs is not None and runs != self._runs_shown:
                    self._runs_shown = runs
                    self.runs_div.text = _runs_html(runs)
            self.info.text = self._info_html(snap, latest)
        self.updates += 1
        self.last_flush_thread = threading.current_thread().name

    def _set_image(self, image: np.ndarray, full_shape: tuple[int, int]) -> None:
        if self.x_range.end != full_shape[1] or self.y_range.start != full_shape[0]:
            self.x_range.update(start=0, end=full_shape[1])
            self.y_range.update(start=full_shape[0], end=0)
            self._view_dirty = False
        self.image_source.data = {
            "image": [image],
            "x": [0],
            "y": [0],
            "dw": [full_shape[1]],
            "dh": [full_shape[0]],
        }

    def _loss_cells(self, holes: int) -> list[tuple[str, Any]]:
        """Seq holes are lost frames, except those a freshest-frame reader skipped on purpose."""
        skipped = getattr(getattr(self, "consumer", None), "skipped_stale", 0)
        if not getattr(self, "latest", False) or not isinstance(skipped, int):
            return [("lost", holes)]
        return [("lost", max(0, holes - skipped)), ("skipped (stale)", skipped)]

    def _info_html(self, snap: dict[str, Any], shown: FrameResult | None) -> str:
        p50 = snap["latency_p50_ms"]
        cells = [
            ("frames", snap["frames"]),
            ("hit rate", f"{snap['hit_rate']:.1%}"),
            ("peaks/frame", f"{snap['peaks_per_frame']:.1f}"),
            *self._loss_cells(snap["lost"]),
            ("latency p50", "-" if p50 is None else f"{p50:.0f} ms"),
            ("source rev", "-" if shown is None else shown.source_rev),
            ("last seq", "-" if shown is None else shown.seq),
            ("image", html.escape(self.image_shows)),
        ]
        tile = self.tile
        if tile is not None:  # what the zoom shows, and how finely
            detail = (
                "full resolution" if tile.block == 1 else f"{tile.block}x{tile.block} px per pixel"
            )
            cells.append(
                ("in view", f"rows {tile.r0}-{tile.r1}, columns {tile.c0}-{tile.c1}, {detail}")
            )
        if self.error:
            cells.append(("error", html.escape(self.error)))
        return f"<b>{html.escape(self.title)}</b> &nbsp; " + " &nbsp;·&nbsp; ".join(
            f"{k}: <b>{v}</b>" for k, v in cells
        )

    # -- drivers --------------------------------------------------------------------------
    @classmethod
    def from_dsn(
        cls,
        dsn_url: str | None = None,
        channel: str | None = None,
        token: str | Callable[[], str] | None = None,
        *,
        params: dict[str, Any] | None = None,
        monitor: bool = False,
        latest: bool | None = None,
        **kwargs: Any,
    ) -> LiveView:
        """Analyse the channel in this process (a StreamConsumer + Analyzer thread) and show it.

        ``monitor=False`` (default): this kernel is the channel's analysis and pulls from its
        work face (frames counted lost are seq gaps, so it should be the only work consumer).
        ``monitor=True``: watch while others (Dask workers) consume the work face: a copy of
        every frame they take, dropped for this viewer when it falls behind (shown as lost).
        ``latest`` (default: ``monitor``): analyse only the freshest frame waiting, skipping (and
        counting, ``consumer.skipped_stale``) the older ones, so the view never shows a backlog.
        """
        from beamhub.streaming.consumer import StreamConsumer
        from beamhub.widgets.steering import DSNClient, _default_token

        dsn_url = dsn_url or os.environ.get("BEAMHUB_DSN_URL", "")
        client = DSNClient(dsn_url, token if token is not None else _default_token())
        channel_id = client.resolve_channel(channel or os.environ.get("BEAMHUB_CHANNEL", ""))
        consumer = StreamConsumer.from_dsn(dsn_url, channel_id, client.token, monitor=monitor)
        view = cls(**kwargs)
        view.analyzer = Analyzer(params)
        view.consumer = consumer
        view.latest = monitor if latest is None else latest
        view._start_driver(view._local_loop)
        return view

    @classmethod
    def from_consumer(
        cls, consumer: Any, analyzer: Analyzer | None = None, **kwargs: Any
    ) -> LiveView:
        """Analyse frames from any consumer with ``receive(timeout)`` on a background thread."""
        view = cls(**kwargs)
        view.analyzer = analyzer or Analyzer()
        view.consumer = consumer
        view._start_driver(view._local_loop)
        return view

    @classmethod
    def from_session(cls, session: Any, poll_period_s: float = 0.02, **kwargs: Any) -> LiveView:
        """Show the results of a :class:`beamhub.streaming.analysis_dask.AnalysisSession`."""
        view = cls(stats=session.stats, **kwargs)
        view.session = session
        view._poll_period = poll_period_s
        view._start_driver(view._session_loop)
        return view

    def _start_driver(self, target: Callable[[], None]) -> None:
        self._driver = threading.Thread(
            target=self._guard, args=(target,), name="liveview-feed", daemon=True
        )
        self._driver.start()

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception as exc:  # shown in the view, never a traceback in the notebook
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("live view feed stopped")
            self._request_flush()

    def _local_loop(self) -> None:
        try:
            while not self._stop.is_set():
                if getattr(self, "latest", False):
                    frame = self.consumer.receive_latest(timeout=0.1)
                else:
                    frame = self.consumer.receive(timeout=0.1)
                if frame is not None:
                    self.feed(self.analyzer.analyse(frame), frame)
        finally:
            self.consumer.close()

    def _session_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:  # the session folds into self.stats; flush reads it under the lock
                results = self.session.poll(timeout=0)
            for result in results:
                self.feed(result, fold=False)
            if not results:
                self._stop.wait(self._poll_period)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the feeding thread (closing its consumer); the figures stay as they are."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._driver is not None:
            self._driver.join(timeout)
        if self._own_loop is not None:
            done = threading.Event()
            self.loop.add_callback(lambda: (self.flush(), done.set()))
            done.wait(timeout)
            self._own_loop.stop()
        else:
            self._request_flush()

    def close(self) -> None:
        if hasattr(self, "_stop"):  # close() also runs (from __del__) for a half-built view
            self.stop()
            self.bokeh.close()
        super().close()


def _image_title(shown: FrameResult, t: float, *, powder: bool) -> str:
    """What the detector image shows, and whose peaks the circles are."""
    if powder:
        return f"powder pattern, circles of hit {shown.seq}"
    when = time.strftime("%H:%M:%S", time.localtime(t))
    if shown.hit:
        return f"last hit: frame {shown.seq} (run {shown.run}) at {when}, {shown.n_peaks} peaks"
    return f"latest frame {shown.seq} (run {shown.run}) at {when}: no hit yet"


def _runs_html(runs: list[dict[str, Any]]) -> str:
    """The run history as a small table (newest first); export with view.export_csv(path, run)."""
    if not runs:
        return ""
    head = "".join(
        f"<th>{h}</th>"
        for h in ("run", "frames", "first", "last", "started", "hits", "hit rate", "peaks/frame")
    )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{v}</td>"
            for v in (
                r["run"],
                r["frames"],
                r["first_seq"],
                r["last_seq"],
                time.strftime("%H:%M:%S", time.localtime(r["start"])),
                r["hits"],
                f"{r['hit_rate']:.3f}",
                f"{r['peaks_per_frame']:.2f}",
            )
        )
        + "</tr>"
        for r in reversed(runs[-10:])
    )
    return (
        f"<b>runs</b> (export: <code>view.export_csv(path, run=N)</code> or "
        f"<code>export_hdf5</code>)<table style='font-size:90%'><tr>{head}</tr>{rows}</table>"
    )
