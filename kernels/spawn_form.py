"""The server options form: project, tier, nodes, walltime and Dask workers, checked by the hub.

Like NERSC's, OLCF's and Open OnDemand's spawn forms, the form offers only what the user may ask
for now and says why a tier is not offered (no beamtime window open, not granted). The form is
never trusted: :func:`check_options` runs on every spawn request (the form's POST and the REST
API alike) and refuses a value with the field's name and its limit.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from html import escape
from typing import Any

from tornado import web

from beamhub.kernels.scheduler import SchedulerError
from beamhub.kernels.tier_policy import TierPolicy

__all__ = [
    "FormError",
    "Offer",
    "TierOffer",
    "ViewerHasNoServer",
    "check_options",
    "make_offer",
    "render_form",
]


class FormError(web.HTTPError):
    """A refused form value: JupyterHub shows the form again with this message and status."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        text = f"{field}: {message}"
        super().__init__(status, "%s", text, reason="Refused server option")
        self.field = field
        self.message = text
        self.jupyterhub_message = text

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class TierOffer:
    """One tier as the form shows it: usable now, or why not."""

    name: str
    usable: bool
    reason: str
    max_walltime_s: int
    max_nodes: int


@dataclass(frozen=True)
class Offer:
    """Everything the user may choose now; the form renders it and the checks enforce it."""

    user: str
    #: project -> role, for the projects where her role may run jobs (empty: roles unknown)
    projects: dict[str, str]
    #: project -> role where she only watches (viewer): no server there
    watch_only: dict[str, str]
    tiers: dict[str, list[TierOffer]]
    best: dict[str, str]  # project -> the tier she gets by default now
    default_project: str
    machine_nodes: int | None
    max_dask_workers: int
    default_walltime_s: int
    notes: dict[str, str] = field(default_factory=dict)

    def tier(self, project: str, name: str) -> TierOffer | None:
        return next((t for t in self.tiers.get(project, []) if t.name == name), None)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h"


def _why_not(policy: TierPolicy, tier_name: str, project: str, now: float, exc: Exception) -> str:
    tier = policy.tiers.get(tier_name)
    if isinstance(exc, SchedulerError) and exc.field == "project":
        return str(exc)
    if tier.window_only:
        book = policy.reservations
        upcoming = book.next_window(project, now) if book is not None else None
        if upcoming is not None:
            return (
                f"no approved beamtime window open for {project} now "
                f"(next: {_utc(upcoming.start)} to {_utc(upcoming.end)})"
            )
        return (
            f"no approved beamtime window open for {project} now (none booked; ask for one "
            "with `beamhub scheduler reservation request`)"
        )
    return str(exc)  # names the tiers she holds there and whom to ask


def make_offer(
    policy: TierPolicy,
    user: str,
    roles: dict[str, str],
    job_roles: set[str],
    *,
    machine_nodes: int | None,
    max_dask_workers: int,
    default_walltime_s: int,
    preferred: str = "",
    now: float | None = None,
) -> Offer:
    """What ``user`` may ask for now, from her project roles (``{project: role}``; empty when
    the authenticator records none) and the tier policy (grants and beamtime windows)."""
    now = time.time() if now is None else now
    projects = {p: r for p, r in roles.items() if r in job_roles}
    watch_only = {p: r for p, r in roles.items() if r not in job_roles}
    tiers: dict[str, list[TierOffer]] = {}
    best: dict[str, str] = {}
    for project in projects:
        offers = []
        for tier in policy.tiers:
            try:
                policy.effective_tier(user, project, requested=tier.name, now=now)
                usable, reason = True, ""
            except SchedulerError as exc:
                usable, reason = False, _why_not(policy, tier.name, project, now, exc)
            offers.append(TierOffer(tier.name, usable, reason, tier.max_walltime_s, tier.max_nodes))
        tiers[project] = offers
        try:
            best[project] = policy.effective_tier(user, project, None, now).name
        except SchedulerError:
            usable = [t.name for t in offers if t.usable]
            best[project] = usable[0] if usable else ""
    default = preferred if preferred in projects else (sorted(projects)[0] if projects else "")
    return Offer(
        user=user,
        projects=projects,
        watch_only=watch_only,
        tiers=tiers,
        best=best,
        default_project=default,
        machine_nodes=machine_nodes,
        max_dask_workers=max_dask_workers,
        default_walltime_s=default_walltime_s,
    )


def _first(value: Any) -> Any:
    """Form data arrive as lists of strings; the REST API sends plain values."""
    if isinstance(value, list | tuple):
        return value[0] if value else None
    return value


def _number(name: str, raw: Any, kind: type, unit: str) -> float:
    try:
        value = kind(str(raw).strip())
    except (TypeError, ValueError):
        raise FormError(name, f"{raw!r} is not a number of {unit}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise FormError(name, f"{raw!r} is not a number of {unit}")
    return value


def check_options(offer: Offer, data: dict[str, Any], check_tier: bool = True) -> dict[str, Any]:
    """The validated user_options for ``data`` (form fields or a REST body), or a FormError
    naming the field and its limit. Missing fields take the defaults the form shows.
    ``check_tier=False`` leaves the tier's refusal to the tier policy (the spawner's start())."""
    data = {k: _first(v) for k, v in (data or {}).items()}
    options: dict[str, Any] = {}
    project = str(data.get("project") or "").strip()
    if offer.projects or offer.watch_only:
        project = project or offer.default_project
        if project in offer.watch_only:
            raise FormError(
                "project",
                f"as a {offer.watch_only[project]} of {project} you watch the experiment on the "
                "shared dashboard (/services/dashboard/): no notebook server there",
                403,
            )
        if project not in offer.projects:
            mine = ", ".join(sorted(offer.projects)) or "none"
            raise FormError(
                "project",
                f"you hold no role in project {project!r} that may run a server "
                f"(yours: {mine}); ask its PI to add you",
                403,
            )
    if project:
        options["project"] = project

    tier_name = str(data.get("tier") or "").strip() or offer.best.get(project, "")
    tier = offer.tier(project, tier_name) if project in offer.tiers else None
    if tier_name and project in offer.tiers:
        if tier is None:
            known = ", ".join(t.name for t in offer.tiers[project])
            raise FormError("tier", f"unknown tier {tier_name!r}; known tiers: {known}")
        if not tier.usable and check_tier:
            raise FormError("tier", f"you may not use {tier_name!r} now: {tier.reason}", 403)
    if tier_name:
        options["tier"] = tier_name

    max_wall = tier.max_walltime_s if tier else None
    raw, seconds = data.get("walltime"), data.get("walltime_s")  # hours (form) or seconds
    if raw in (None, "") and seconds in (None, ""):
        walltime_s = offer.default_walltime_s
        if max_wall is not None:
            walltime_s = min(walltime_s, max_wall)
    else:
        if raw in (None, ""):
            walltime_s = int(_number("walltime", seconds, int, "seconds"))
        else:
            walltime_s = round(_number("walltime", raw, float, "hours") * 3600)
        hours = walltime_s / 3600
        if walltime_s < 60:
            raise FormError("walltime", f"{hours:g} h is under the minimum of 1 minute")
        if max_wall is not None and walltime_s > max_wall:
            raise FormError(
                "walltime",
                f"{hours:g} h is over tier {tier_name!r}'s limit of {_hours(max_wall)}; ask for "
                f"at most {_hours(max_wall)} or pick a tier with a longer limit",
            )
    options["walltime_s"] = walltime_s

    raw = data.get("nodes")
    nodes = 1 if raw in (None, "") else int(_number("nodes", raw, int, "nodes"))
    if nodes < 1:
        raise FormError("nodes", f"{nodes} is under the minimum of 1 node")
    if tier is not None and nodes > tier.max_nodes:
        raise FormError(
            "nodes", f"{nodes} is over tier {tier_name!r}'s limit of {tier.max_nodes} node(s)"
        )
    if offer.machine_nodes and nodes > offer.machine_nodes:
        raise FormError("nodes", f"{nodes} is over the {offer.machine_nodes} nodes there are")
    options["nodes"] = nodes

    raw = data.get("dask_workers")
    workers = 0 if raw in (None, "") else int(_number("dask_workers", raw, int, "workers"))
    if workers < 0:
        raise FormError("dask_workers", f"{workers} is under the minimum of 0 Dask workers")
    if workers > offer.max_dask_workers:
        raise FormError(
            "dask_workers",
            f"{workers} Dask workers is over the limit of {offer.max_dask_workers} per server",
        )
    options["dask_workers"] = workers
    return options


def _code(text: str) -> str:
    """Escaped text with `commands` shown as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text))


def _tier_label(t: TierOffer) -> str:
    limits = f"up to {_hours(t.max_walltime_s)}, {t.max_nodes} node(s)"
    if t.usable:
        return f"<strong>{escape(t.name)}</strong> <small class='text-muted'>{limits}</small>"
    return (
        f"<strong>{escape(t.name)}</strong> <small class='text-muted'>{limits}</small>"
        f"<br><small class='beamhub-why-not text-danger'>not now: {_code(t.reason)}</small>"
    )


def render_form(offer: Offer) -> str:
    """The HTML inside JupyterHub's spawn.html form: one tier list per project (the script
    shows the chosen project's), limits on every input, the reason next to each tier not
    offered. The browser's limits are a convenience: :func:`check_options` decides."""
    parts = []
    project_opts = "".join(
        f'<option value="{escape(p)}"{" selected" if p == offer.default_project else ""}>'
        f"{escape(p)} ({escape(r)})</option>"
        for p, r in sorted(offer.projects.items())
    )
    parts.append(
        '<div class="mb-3"><label class="form-label" for="beamhub-project">Project</label>'
        f'<select class="form-select" id="beamhub-project" name="project">{project_opts}</select>'
    )
    if offer.watch_only:
        watched = ", ".join(
            f"{escape(p)} ({escape(r)})" for p, r in sorted(offer.watch_only.items())
        )
        parts.append(
            f'<div class="form-text">Watch only, on the <a href="/services/dashboard/">shared '
            f"dashboard</a>: {watched}</div>"
        )
    parts.append("</div>")
    limits: dict[str, dict[str, list[int]]] = {}
    for project, tiers in sorted(offer.tiers.items()):
        hidden = "" if project == offer.default_project else " hidden"
        disabled = "" if project == offer.default_project else " disabled"
        rows = []
        for t in tiers:
            tid = f"tier-{project}-{t.name}"
            checked = " checked" if t.usable and t.name == offer.best.get(project) else ""
            off = "" if t.usable else " disabled"
            rows.append(
                f'<div class="form-check"><input class="form-check-input" type="radio" '
                f'name="tier" id="{escape(tid)}" value="{escape(t.name)}"{checked}{off}>'
                f'<label class="form-check-label" for="{escape(tid)}">{_tier_label(t)}</label>'
                "</div>"
            )
        parts.append(
            f'<fieldset class="mb-3 beamhub-tiers" data-project="{escape(project)}"{hidden}'
            f"{disabled}><legend class='form-label fs-6'>Tier (QoS) for {escape(project)}"
            f"</legend>{''.join(rows)}</fieldset>"
        )
        limits[project] = {t.name: [t.max_walltime_s, t.max_nodes] for t in tiers}
    best = offer.tier(offer.default_project, offer.best.get(offer.default_project, ""))
    max_wall = best.max_walltime_s if best else offer.default_walltime_s
    max_nodes = best.max_nodes if best else 1
    if offer.machine_nodes:
        max_nodes = min(max_nodes, offer.machine_nodes)
    wall_h = min(offer.default_walltime_s, max_wall) / 3600
    parts.append(
        '<div class="row mb-3">'
        '<div class="col"><label class="form-label" for="beamhub-walltime">Walltime (hours)</label>'
        f'<input class="form-control" type="number" id="beamhub-walltime" name="walltime" '
        f'min="0.25" step="0.25" max="{max_wall / 3600:g}" value="{wall_h:g}">'
        f'<div class="form-text" id="beamhub-walltime-help">at most {_hours(max_wall)} at this '
        "tier; the server stops then</div></div>"
        '<div class="col"><label class="form-label" for="beamhub-nodes">Nodes</label>'
        f'<input class="form-control" type="number" id="beamhub-nodes" name="nodes" min="1" '
        f'max="{max_nodes}" value="1"><div class="form-text" id="beamhub-nodes-help">at most '
        f"{max_nodes} at this tier</div></div>"
        '<div class="col"><label class="form-label" for="beamhub-dask">Dask workers</label>'
        f'<input class="form-control" type="number" id="beamhub-dask" name="dask_workers" '
        f'min="0" max="{offer.max_dask_workers}" value="0"><div class="form-text">0 to '
        f"{offer.max_dask_workers}; the notebook finds it in <code>$BEAMHUB_DASK_WORKERS</code>"
        "</div></div></div>"
    )
    parts.append(
        "<script>(function(){"
        f"const limits={json.dumps(limits)};const machine={json.dumps(offer.machine_nodes)};"
        "const project=document.getElementById('beamhub-project');"
        "const wall=document.getElementById('beamhub-walltime');"
        "const nodes=document.getElementById('beamhub-nodes');"
        "function update(){const p=project.value;"
        "document.querySelectorAll('.beamhub-tiers').forEach(f=>{const on=f.dataset.project===p;"
        "f.hidden=!on;f.disabled=!on;});"
        "const picked=document.querySelector('.beamhub-tiers:not([disabled]) input:checked');"
        "if(!picked)return;const lim=limits[p][picked.value];"
        "const n=machine?Math.min(lim[1],machine):lim[1];"
        "wall.max=lim[0]/3600;nodes.max=n;"
        "document.getElementById('beamhub-walltime-help').textContent="
        "'at most '+(lim[0]/3600)+' h at this tier; the server stops then';"
        "document.getElementById('beamhub-nodes-help').textContent='at most '+n+' at this tier';}"
        "project.addEventListener('change',update);"
        "document.querySelectorAll('.beamhub-tiers input').forEach("
        "i=>i.addEventListener('change',update));update();})();</script>"
    )
    return "".join(parts)


class ViewerHasNoServer(web.HTTPError):
    """A viewer watches the shared dashboard: no notebook server, no compute."""

    def __init__(self, role: str, project: str) -> None:
        message = (
            f"As a {role} of {project} you watch the experiment on the shared dashboard; "
            "viewers get no notebook server or compute. Ask the project's PI for the member "
            "role to analyse data."
        )
        super().__init__(403, "%s", message, reason="No server for viewers")
        self.jupyterhub_message = message
        self.jupyterhub_html_message = (
            f"<p>{escape(message)}</p>"
            '<p><a class="btn btn-primary" href="/services/dashboard/">Open the dashboard</a></p>'
        )
