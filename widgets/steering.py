"""SteeringPanel: ipywidgets built from a source's parameter schema, steering it through the DSN relay.

In a notebook (the server's environment holds BEAMHUB_DSN_URL and BEAMHUB_TOKEN)::

    from beamhub.widgets import LiveView, SteeringPanel
    view = LiveView.from_dsn(channel="det")      # optional: measures the round trip
    panel = SteeringPanel(channel="det", live_view=view)
    panel                                        # sliders, dropdowns, toggles, run buttons
    panel.set("sample_position_um", 100.0)       # the same path as moving the slider

``channel`` is a channel id (``ch-...``) or a stream name of the token's project. Each change is
sent (debounced, sliders with ``continuous_update=False``) as ``PUT .../steer/params/NAME``; the
panel shows the new revision, the first frame seq that reflects it and, when frames are observed
(``live_view=`` or calls to :meth:`SteeringPanel.frame_seen`), the round trip until the first frame
with that revision was seen. Without the ``steer`` scope every control is disabled ("view only").
DSN refusals (400 out of bounds, 403 scope, 5xx) are shown in the panel, never raised.
"""

from __future__ import annotations

import decimal
import functools
import html
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from beamhub.streaming.credentials import ChannelLookupError, resolve_channel

__all__ = ["DSNClient", "SteerError", "SteeringPanel", "token_claims"]

VIEW_ONLY_NOTE = "view only: your role lacks steer"
RECENT_ROWS = 8


class SteerError(RuntimeError):
    """A DSN call that did not succeed; ``status`` is the HTTP status (0: unreachable)."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


def token_claims(token: str) -> dict[str, Any]:
    """The token's claims, UNVERIFIED: only to label the UI (user, scopes); the DSN verifies."""
    import jwt

    try:
        return jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}


class DSNClient:
    """Blocking JSON calls to the DSN control API with the current project token."""

    def __init__(self, dsn_url: str, token: str | Callable[[], str], timeout: float = 10.0):
        if not dsn_url.startswith(("http://", "https://")):
            raise ValueError(f"dsn_url: {dsn_url!r} must start with http:// or https://")
        self.dsn_url = dsn_url.rstrip("/")
        self._token = token
        self.timeout = timeout

    @property
    def token(self) -> str:
        return self._token() if callable(self._token) else self._token

    def call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """The JSON answer; raises :class:`SteerError` with the DSN's message on any failure."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            self.dsn_url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            try:
                answer = json.loads(exc.read(4000) or b"{}")
            except ValueError:
                answer = {}
            message = answer.get("message") if isinstance(answer, dict) else None
            raise SteerError(
                exc.code,
                f"HTTP {exc.code}: {message or exc.reason}",
                answer if isinstance(answer, dict) else {},
            ) from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise SteerError(0, f"cannot reach the DSN at {self.dsn_url}: {exc}") from exc

    def resolve_channel(self, channel: str) -> str:
        """A channel id as given, or the id of the project's channel streaming ``channel``."""
        try:
            return resolve_channel(self.dsn_url, channel, self.token, timeout=self.timeout)
        except ChannelLookupError as exc:
            raise SteerError(exc.status, str(exc)) from exc


def _default_token() -> str | Callable[[], str]:
    from beamhub.auth.token_client import RefreshError, TokenRefresher

    try:
        refresher = TokenRefresher.from_env().start()
        return lambda: refresher.token
    except RefreshError:
        pass  # not in a spawned server: a plain token from the environment
    token = os.environ.get("BEAMHUB_TOKEN")
    if not token:
        raise ValueError("token: none given and BEAMHUB_TOKEN is unset; pass token=...")
    return token


class SteeringPanel(w.VBox):
    """One control per schema parameter, run start/stop, change log; see the module docstring."""

    def __init__(
        self,
        dsn_url: str | None = None,
        channel: str | None = None,
        token: str | Callable[[], str] | None = None,
        *,
        live_view: Any = None,
        debounce_s: float = 0.15,
        timeout: float = 10.0,
        **kwargs: Any,
    ) -> None:
        dsn_url = dsn_url or os.environ.get("BEAMHUB_DSN_URL")
        if not dsn_url:
            raise ValueError("dsn_url: none given and BEAMHUB_DSN_URL is unset")
        channel = channel or os.environ.get("BEAMHUB_CHANNEL", "")
        if not channel:
            raise ValueError("channel: give a channel id (ch-...) or a stream name")
        self.client = DSNClient(dsn_url, token if token is not None else _default_token(), timeout)
        claims = token_claims(self.client.token)
        self.user = str(claims.get("sub", "?"))
        self.can_steer = "steer" in str(claims.get("scope", "")).split()
        self.debounce_s = debounce_s
        self.live_view = live_view  # gets a marker per steering action (LiveView.mark)
        self.changes: deque[dict[str, Any]] = deque(maxlen=50)
        self.last_answer: dict[str, Any] | None = None
        self.last_error: str | None = None
        self.controls: dict[str, w.ValueWidget] = {}
        self._digits: dict[str, int] = {}  # decimals of each float parameter's step
        self.schema: list[dict[str, Any]] = []
        self.rev = 0
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._quiet = False  # set while the panel writes values it got from the DSN
        self._waiting: list[dict[str, Any]] = []  # changes whose first frame is not seen yet
        self.status = w.HTML()
        self.note = w.HTML()
        self.table = w.HTML()
        self.title = w.HTML()
        super().__init__(**kwargs)
        try:
            self.channel_id = self.client.resolve_channel(channel)
            self.schema = self.client.call("GET", f"/api/channels/{self.channel_id}/steer/schema")[
                "params"
            ]
            state = self.client.call("GET", f"/api/channels/{self.channel_id}/steer/params")
        except SteerError as exc:
            self.channel_id = channel
            self._show_error(f"cannot load the steering schema: {exc}")
            self.children = [self.title, self.status]
            return
        self._build(state)
        if live_view is not None:
            live_view.add_listener(lambda r: self.frame_seen(r.seq, r.source_rev))
            self._show_changes(state)
        self._sender = threading.Thread(target=self._send_loop, name="steering-panel", daemon=True)
        self._sender.start()

    # -- building --------------------------------------------------------------------------
    def _build(self, state: dict[str, Any]) -> None:
        values = state.get("values", {})
        self.rev = int(state.get("rev", 0))
        for spec in self.schema:
            if spec["type"] == "float" and spec.get("step"):
                exponent = decimal.Decimal(str(spec["step"])).as_tuple().exponent
                self._digits[spec["name"]] = max(0, -int(exponent))
            control = _control_for(spec, values.get(spec["name"], spec.get("default")))
            control.disabled = not self.can_steer
            control.observe(functools.partial(self._on_change, spec["name"]), names="value")
            self.controls[spec["name"]] = control
        self.start_button = w.Button(
            description="Start run", icon="play", disabled=not self.can_steer
        )
        self.stop_button = w.Button(
            description="Stop run", icon="stop", disabled=not self.can_steer
        )
        self.start_button.on_click(lambda _: self._run("start"))
        self.stop_button.on_click(lambda _: self._run("stop"))
        refresh = w.Button(description="Refresh", icon="refresh", tooltip="read values again")
        refresh.on_click(lambda _: self.refresh())
        running = "running" if state.get("running") else "stopped"
        self.title.value = (
            f"<b>Steering</b> channel <code>{html.escape(self.channel_id)}</code> "
            f"({running}, run {state.get('run', '?')}) as "
            f"<b>{html.escape(self.user)}</b>"
        )
        if not self.can_steer:
            self.note.value = f'<span style="color:#a15c00">&#9888; {VIEW_ONLY_NOTE}</span>'
        self._show(f"rev {self.rev}")
        self.children = [
            self.title,
            self.note,
            *self.controls.values(),
            w.HBox([self.start_button, self.stop_button, refresh]),
            self.status,
            self.table,
        ]

    # -- sending -------------------------------------------------------------------------
    def _on_change(self, name: str, change: dict[str, Any]) -> None:
        if self._quiet:
            return
        if not self.can_steer:
            self._show_error(f"{VIEW_ONLY_NOTE}; {name} was not changed")
            self._set_quietly(name, change["old"])
            return
        value = change["new"]
        digits = self._digits.get(name)
        if digits is not None:  # a float slider's 4.000000000000057 is the step's 4.0
            value = round(value, digits)
        with self._lock:
            self._pending[name] = value
            self._idle.clear()
        self._wake.set()

    def _send_loop(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            if self.debounce_s > 0:  # a burst of changes sends only the last value of each
                time.sleep(self.debounce_s)
            with self._lock:
                pending, self._pending = self._pending, {}
            for name, value in pending.items():
                self._steer(name, value)
            with self._lock:
                if not self._pending:
                    self._idle.set()

    def set(self, name: str, value: Any) -> dict[str, Any] | None:
        """Steer ``name`` now (no widget bounds: the DSN judges); the answer, or None if refused."""
        if not self.can_steer:
            self._show_error(f"{VIEW_ONLY_NOTE}; {name} was not changed")
            return None
        return self._steer(name, value)

    def _steer(self, name: str, value: Any) -> dict[str, Any] | None:
        t0 = time.monotonic()
        try:
            answer = self.client.call(
                "PUT", f"/api/channels/{self.channel_id}/steer/params/{name}", {"value": value}
            )
        except SteerError as exc:
            self._show_error(f"{name} = {value!r} refused: {exc}")
            self.refresh(quiet_errors=True)  # put the control back to the source's value
            return None
        http_ms = (time.monotonic() - t0) * 1e3
        entry = {
            "t": time.time(),
            "t0": t0,
            "user": self.user,
            "name": name,
            "value": answer.get("value"),
            "rev": answer.get("rev"),
            "first_seq": answer.get("first_seq"),
            "http_ms": round(http_ms, 1),
            "round_trip_ms": None,
            "seen_seq": None,
        }
        with self._lock:
            self.rev = max(self.rev, int(answer.get("rev", 0)))
            self.changes.appendleft(entry)
            self._waiting.append(entry)
        self.last_answer = answer
        self.last_error = None
        if self.live_view is not None:  # a marker on the live view's time plot: what, who
            self.live_view.mark("param", self.user, name=name, value=answer.get("value"))
        if name in self.controls and answer.get("value") is not None:
            self._set_quietly(name, answer["value"])
        self._show(
            f"{name} = {answer.get('value')!r}: rev {answer.get('rev')}, from frame "
            f"{answer.get('first_seq')} (DSN answered in {http_ms:.0f} ms)"
        )
        return answer

    def _run(self, action: str) -> None:
        if not self.can_steer:
            self._show_error(f"{VIEW_ONLY_NOTE}; the run was not {action}ed")
            return
        try:
            answer = self.client.call(
                "POST", f"/api/channels/{self.channel_id}/steer/run", {"action": action}
            )
        except SteerError as exc:
            self._show_error(f"run {action} refused: {exc}")
            return
        if self.live_view is not None:
            self.live_view.mark(f"run_{action}", self.user, run=answer.get("run"))
        self._show(f"run {answer.get('run')}: {'running' if answer.get('running') else 'stopped'}")

    # -- observing frames -------------------------------------------------------------------
    def frame_seen(self, seq: int, rev: int) -> None:
        """A frame (``seq``, source ``rev``) was analysed/seen; completes pending round trips.

        Thread-safe; a live view or an analysis loop calls it for each frame result.
        """
        if not self._waiting:
            return
        now = time.monotonic()
        done = []
        with self._lock:
            for entry in self._waiting:
                if entry["rev"] is not None and rev >= entry["rev"]:
                    entry["round_trip_ms"] = round((now - entry["t0"]) * 1e3, 1)
                    entry["seen_seq"] = seq
                    done.append(entry)
            self._waiting = [e for e in self._waiting if e not in done]
        if done:
            last = done[-1]
            self._show(
                f"{last['name']} = {last['value']!r}: rev {last['rev']} seen in frame "
                f"{seq} (first {last['first_seq']}), round trip "
                f"{last['round_trip_ms']:.0f} ms"
            )

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once every widget change has been sent and answered (for scripts and tests)."""
        return self._idle.wait(timeout)

    # -- reading back ---------------------------------------------------------------------
    def refresh(self, quiet_errors: bool = False) -> None:
        """Read the source's values again (another user may have steered)."""
        try:
            state = self.client.call("GET", f"/api/channels/{self.channel_id}/steer/params")
        except SteerError as exc:
            if not quiet_errors:
                self._show_error(f"cannot read the parameters: {exc}")
            return
        rev = int(state.get("rev", 0))
        with self._lock:
            if rev > self.rev and not quiet_errors:
                self.changes.appendleft(
                    {
                        "t": time.time(),
                        "user": "(another client)",
                        "name": "?",
                        "value": None,
                        "rev": rev,
                        "first_seq": None,
                        "http_ms": None,
                        "round_trip_ms": None,
                        "seen_seq": None,
                    }
                )
            self.rev = max(self.rev, rev)
        for name, value in state.get("values", {}).items():
            if name in self.controls:
                self._set_quietly(name, value)
        self._show_changes(state)
        self._render_table()

    def _show_changes(self, state: dict[str, Any]) -> None:
        """Give the live view the source's steering log (every client's changes, with who)."""
        if getattr(self, "live_view", None) is not None and "changes" in state:
            units = {p["name"]: p.get("units") or "" for p in self.schema}
            self.live_view.set_changes(state["changes"], units)

    def _set_quietly(self, name: str, value: Any) -> None:
        self._quiet = True
        try:
            self.controls[name].value = value
        finally:
            self._quiet = False

    # -- display ----------------------------------------------------------------------------
    def _show(self, text: str) -> None:
        self.status.value = f'<span style="color:#1a5e20">{html.escape(text)}</span>'
        self._render_table()

    def _show_error(self, text: str) -> None:
        self.last_error = text
        self.status.value = f'<span style="color:#b00020">&#10007; {html.escape(text)}</span>'

    def _render_table(self) -> None:
        rows = []
        for e in list(self.changes)[:RECENT_ROWS]:
            rt = "" if e["round_trip_ms"] is None else f"{e['round_trip_ms']:.0f} ms"
            cells = [
                time.strftime("%H:%M:%S", time.localtime(e["t"])),
                e["user"],
                e["name"],
                "" if e["value"] is None else repr(e["value"]),
                e["rev"],
                "" if e["first_seq"] is None else e["first_seq"],
                rt,
            ]
            rows.append(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
            )
        head = "".join(
            f"<th>{h}</th>"
            for h in ("time", "who", "parameter", "value", "rev", "first frame", "round trip")
        )
        self.table.value = (
            f'<table style="font-size:90%"><tr>{head}</tr>{"".join(rows)}</table>' if rows else ""
        )

    def close(self) -> None:
        self._closed = True
        wake = getattr(self, "_wake", None)  # close() also runs for a half-built panel
        if wake is not None:
            wake.set()
        super().close()


#: How units are written for people (the schema keeps ASCII names).
_UNITS = {"um": "µm", "mm": "mm", "nm": "nm", "deg": "°", "s": "s", "ms": "ms", "Hz": "Hz",
          "keV": "keV", "eV": "eV", "px": "px"}  # fmt: skip


def control_label(name: str, units: str) -> str:
    """``sample_position_um`` with units ``um`` → ``sample position (µm)``."""
    words = name.removesuffix(f"_{units}") if units else name
    shown = _UNITS.get(units, units)
    return words.replace("_", " ") + (f" ({shown})" if shown else "")


def _control_for(spec: dict[str, Any], value: Any) -> w.ValueWidget:
    """The widget for one schema entry: slider (float/int), dropdown (choice), toggle (bool)."""
    name, kind = spec["name"], spec["type"]
    common = {
        "description": control_label(name, spec.get("units") or ""),
        "tooltip": spec.get("description", ""),
        "style": {"description_width": "initial"},
        "layout": w.Layout(width="min(100%, 560px)"),
    }
    if kind in ("float", "int"):
        cls = w.FloatSlider if kind == "float" else w.IntSlider
        bounds = {k: spec[k] for k in ("min", "max", "step") if spec.get(k) is not None}
        control = cls(value=value, continuous_update=False, readout=True, **bounds, **common)
    elif kind == "choice":
        control = w.Dropdown(options=list(spec["choices"]), value=value, **common)
    elif kind == "bool":
        control = w.ToggleButton(value=bool(value), **common)
    else:
        raise ValueError(f"parameter {name!r}: unsupported type {kind!r}")
    return control
