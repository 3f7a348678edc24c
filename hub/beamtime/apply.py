"""Apply a beamtime unit: request its window now, create the rest when the window opens.

`beamhub beamtime apply FILE` requests the window in the reservation book (and, with
``--approve``, approves it as the admin running it) and records the unit as JSON in
``<state>/beamtime/``. Whatever is due is then created by :func:`open_due`, which
`beamhub beamtime apply --wait` runs until the window opens and `beamhub beamtime open` runs once
(idempotent: cron or a systemd timer can run it every minute). For each recorded unit whose
approved window is open and that has nothing yet, it creates, through the gateway (so policy,
rate limits and the audit log apply as to any client):

1. the channel (``POST /projects/P/channels``: stream, mode, encryption, a lifetime up to the
   window's end);
2. the analysis job (``POST /projects/P/jobs`` at the unit's tier on its nodes, walltime up to the
   window's end) running :mod:`beamhub.hub.beamtime.analysis` with the workers and finder
   parameters, on whichever backend the hub runs (the embedded scheduler or SLURM);
3. the dashboard: the project's shared dashboard URL is recorded with the unit.

A unit whose window was denied, or ended before anything was created, is marked ``skipped``
with the reason. Each unit's file says what exists (channel id, job id) and when it was made.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from beamhub.hub.beamtime.plan import Unit

__all__ = ["ApplyError", "open_due", "record", "units"]


class ApplyError(RuntimeError):
    """Creating part of a unit failed; the message names the part and the service's answer."""


def _units_dir(state: Path) -> Path:
    path = Path(state) / "beamtime"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def record(unit: Unit, window_id: int, state: Path, by: str) -> Path:
    """Write the unit, waiting for window ``window_id``; returns its file."""
    path = _units_dir(state) / f"{unit.project}-w{window_id}.json"
    _write(
        path,
        {
            "unit": unit.to_dict(),
            "window_id": window_id,
            "status": "waiting",
            "applied_by": by,
            "applied_at": time.time(),
        },
    )
    return path


def units(state: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every recorded unit, oldest file first."""
    found = []
    for path in sorted(_units_dir(state).glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return found


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _call(method: str, url: str, token: str, body: dict[str, Any], what: str) -> dict[str, Any]:
    if not url.startswith(("http://", "https://")):
        raise ApplyError(f"{what}: the gateway URL {url!r} must be http(s)")
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        url,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - our gateway
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            answer = json.loads(exc.read())
            detail = answer.get("message") or answer.get("error") or answer
            field = answer.get("field")
        except ValueError:
            detail, field = exc.reason, None
        where = f" (field {field})" if field else ""
        raise ApplyError(f"{what}: the gateway answered {exc.code}: {detail}{where}") from None
    except OSError as exc:
        raise ApplyError(f"{what}: cannot reach the gateway at {url}: {exc}") from None


def _create(
    unit: Unit,
    window: Any,
    gateway_url: str,
    dsn_url: str,
    token: str,
    dashboard_url: str | None,
    now: float,
) -> dict[str, Any]:
    base = f"{gateway_url.rstrip('/')}/projects/{unit.project}"
    remaining = int(window.end - now)
    channel_body: dict[str, Any] = {"stream": unit.stream, "ttl": remaining}
    if unit.mode is not None:
        channel_body["mode"] = unit.mode
    if unit.encryption is not None:
        channel_body["encryption"] = unit.encryption
    channel = _call("POST", f"{base}/channels", token, channel_body, "the channel")
    argv = [
        *(sys.executable, "-m", "beamhub.hub.beamtime.analysis"),
        *("--channel", channel["id"], "--workers", str(unit.workers)),
        *("--finder", json.dumps(unit.finder), "--until", str(window.end)),
    ]
    job = _call(
        "POST",
        f"{base}/jobs",
        token,
        {
            "name": f"beamtime-w{window.id}-analysis",
            "argv": argv,
            "tier": unit.tier,
            "nodes": unit.nodes,
            "walltime_s": remaining,
            "env": {"BEAMHUB_DSN_URL": dsn_url, "BEAMHUB_TOKEN": token},
        },
        "the analysis job",
    )
    return {
        "channel": channel["id"],
        "job": job["job_id"],
        "job_tier": job.get("tier"),
        "dashboard": dashboard_url if unit.dashboard else None,
    }


def open_due(
    state: Path,
    book: Any,
    gateway_url: str,
    dsn_url: str,
    token_for: Callable[[Unit, float, str], str],
    dashboard_url: str | None = None,
    now: float | None = None,
) -> list[dict[str, Any]]:
    """Create what is due for every waiting unit (see the module's doc); returns what changed.
    ``token_for(unit, lifetime_s, user)``: a project token of ``user`` (who applied the unit) with
    the scopes stream.publish, stream.read and jobs, for the channel, the job submission and the
    job's workers."""
    now = time.time() if now is None else now
    changed = []
    for path, data in units(state):
        if data.get("status") != "waiting":
            continue
        unit = Unit.from_dict(data["unit"])
        window = book.get(int(data["window_id"]))
        current = window.state(now)
        if current in ("denied", "expired", "ended"):
            data.update(status="skipped", why=f"window {window.id} is {current}", at=now)
        elif current == "active":
            token = token_for(unit, window.end - now, str(data.get("applied_by") or ""))
            try:
                created = _create(unit, window, gateway_url, dsn_url, token, dashboard_url, now)
            except ApplyError as exc:
                data.update(last_error=str(exc), last_error_at=now)
                _write(path, data)
                changed.append({"file": str(path), "status": "waiting", "error": str(exc)})
                continue
            data.update(status="created", created=created, created_at=now)
            data.pop("last_error", None)
        else:
            continue
        _write(path, data)
        changed.append(
            {"file": str(path), **{k: data.get(k) for k in ("status", "created", "why")}}
        )
    return changed
