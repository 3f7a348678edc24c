"""A beamtime as one declarative unit: read a beamtime file, check it, say what will be created.

A beamtime file (YAML) has one ``beamtime:`` section::

    beamtime:
      project: p-1001
      justification: SFX on lysozyme, 12 h
      window: {start: 2027-01-12T08:00Z, end: 2027-01-12T20:00Z}   # or now / +10m / +2h
      tier: beamtime
      nodes: 2
      stream: {name: detector, template: default, mode: l7, encryption: false}
      analysis: {workers: 2, finder: {min_snr: 5, min_peaks_for_hit: 8}}
      dashboard: {enabled: true}

:func:`load_unit` validates its shape (every error names the field, e.g.
``beamtime.window.end``); :func:`plan` checks it against the enclave profile (the DSN template
the enclave uses, and that template's limits), the QoS tiers, the peak finder's parameter bounds
and the maintenance calendar, and lists the steps `beamhub beamtime apply` takes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

__all__ = ["MAX_WORKERS", "BeamtimeError", "Plan", "Problem", "Unit", "load_unit", "plan"]

#: Analysis workers one beamtime may ask for (the spawn form's Dask limit).
MAX_WORKERS = 8
_TOP = {"project", "justification", "window", "tier", "nodes", "stream", "analysis", "dashboard"}
_STREAM = {"name", "template", "mode", "encryption"}
_ANALYSIS = {"workers", "finder"}
_DASHBOARD = {"enabled"}


class BeamtimeError(ValueError):
    """A beamtime file that cannot be used; ``field`` is its dotted path, e.g. beamtime.nodes."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Unit:
    """A validated beamtime section."""

    project: str
    justification: str
    start: float
    end: float
    tier: str
    nodes: int
    stream: str
    template: str | None  # None: the enclave's template
    mode: str | None
    encryption: bool | None
    workers: int
    finder: dict[str, Any]
    dashboard: bool
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Unit:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Problem:
    """A check the file fails: the field to fix and what is wrong."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@dataclass
class Plan:
    """What apply will do (``steps``) and what stops it (``problems``)."""

    unit: Unit
    enclave: str
    template_path: str
    steps: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _fmt(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _when(value: Any, name: str, now: float) -> float:
    """ISO 8601 (UTC unless it has an offset), epoch seconds, 'now' or '+N[smhd]'."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if text == "now":
        return now
    if text.startswith("+") and text[-1:] in ("s", "m", "h", "d") and text[1:-1].isdigit():
        return now + int(text[1:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[text[-1]]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BeamtimeError(
            name, f"{value!r} is not a time; use ISO 8601 (2027-01-12T08:00Z), 'now' or '+2h'"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _mapping(value: Any, name: str, known: set[str]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BeamtimeError(name, f"must be a mapping of {', '.join(sorted(known))}")
    unknown = sorted(set(value) - known)
    if unknown:
        raise BeamtimeError(
            f"{name}.{unknown[0]}", f"unknown field; known here: {', '.join(sorted(known))}"
        )
    return value


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BeamtimeError(name, f"{value!r} must be a whole number from {low} to {high}")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BeamtimeError(name, "must be a non-empty string")
    return value.strip()


def load_unit(path: str | Path, now: float | None = None) -> Unit:
    """Read and validate a beamtime file's shape (not yet what the facility allows: :func:`plan`)."""
    now = time.time() if now is None else now
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise BeamtimeError("file", f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise BeamtimeError("file", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(doc, Mapping) or "beamtime" not in doc:
        raise BeamtimeError("beamtime", f"{path} has no 'beamtime:' section")
    bt = _mapping(doc["beamtime"], "beamtime", _TOP)
    for required in ("project", "justification", "window", "stream"):
        if required not in bt:
            raise BeamtimeError(f"beamtime.{required}", "is required")
    window = _mapping(bt["window"], "beamtime.window", {"start", "end"})
    for required in ("start", "end"):
        if required not in window:
            raise BeamtimeError(f"beamtime.window.{required}", "is required")
    start = _when(window["start"], "beamtime.window.start", now)
    end = _when(window["end"], "beamtime.window.end", now)
    if end <= start:
        raise BeamtimeError(
            "beamtime.window.end", f"{_fmt(end)} is not after the start {_fmt(start)}"
        )
    if end <= now:
        raise BeamtimeError("beamtime.window.end", f"{_fmt(end)} is already over")
    stream = _mapping(bt["stream"], "beamtime.stream", _STREAM)
    analysis = _mapping(bt.get("analysis"), "beamtime.analysis", _ANALYSIS)
    dashboard = _mapping(bt.get("dashboard"), "beamtime.dashboard", _DASHBOARD)
    finder = analysis.get("finder") or {}
    if not isinstance(finder, Mapping):
        raise BeamtimeError("beamtime.analysis.finder", "must be a mapping of parameter: value")
    encryption = stream.get("encryption")
    if encryption is not None and not isinstance(encryption, bool):
        raise BeamtimeError("beamtime.stream.encryption", "must be true or false")
    enabled = dashboard.get("enabled", True)
    if not isinstance(enabled, bool):
        raise BeamtimeError("beamtime.dashboard.enabled", "must be true or false")
    return Unit(
        project=_text(bt["project"], "beamtime.project"),
        justification=_text(bt["justification"], "beamtime.justification"),
        start=start,
        end=end,
        tier=_text(bt.get("tier", "beamtime"), "beamtime.tier"),
        nodes=_int(bt.get("nodes", 1), "beamtime.nodes", 1, 4096),
        stream=_text(stream.get("name", "detector"), "beamtime.stream.name"),
        template=_text(stream["template"], "beamtime.stream.template")
        if "template" in stream
        else None,
        mode=_text(stream["mode"], "beamtime.stream.mode") if "mode" in stream else None,
        encryption=encryption,
        workers=_int(analysis.get("workers", 1), "beamtime.analysis.workers", 1, MAX_WORKERS),
        finder=dict(finder),
        dashboard=enabled,
        source=str(path),
    )


def _template_file(name: str, base: Path | None) -> Path:
    """A template named in the file: a path, or a shipped template's name (``moderate``)."""
    from beamhub.hub.enclave import resolve_path
    from beamhub.streaming.template import TEMPLATE_DIR

    if "/" not in name and not name.endswith((".yaml", ".yml")):
        return TEMPLATE_DIR / f"{name}.yaml"
    return resolve_path(name, base)


def plan(
    unit: Unit,
    deployment: Any,
    book: Any,
    tiers: Any = None,
    now: float | None = None,
    approve: bool = False,
) -> Plan:
    """Check ``unit`` against the deployment's enclave profile and DSN template, the tiers, the
    peak finder's bounds and the maintenance calendar (``book``: the reservation book); list the
    steps of apply."""
    from beamhub.hub.enclave import resolve_path
    from beamhub.kernels.maintenance import BEAMTIME_NEEDS
    from beamhub.kernels.scheduler import SchedulerError
    from beamhub.kernels.tiers import DEFAULT_TIERS
    from beamhub.streaming.params import ParamError
    from beamhub.streaming.peakfinder import PeakFinderParams
    from beamhub.streaming.template import Template, TemplateError, TemplateViolation

    now = time.time() if now is None else now
    tiers = tiers or getattr(book, "tiers", None) or DEFAULT_TIERS
    source = Path(deployment.source)
    base = source.resolve().parent if source.is_file() else None
    enclave_template = resolve_path(deployment.dsn_template, base).resolve()
    out = Plan(unit, deployment.enclave, str(enclave_template))
    problems = out.problems

    # the enclave profile: channels are made from the template its DSN runs with
    if unit.template is not None:
        named = _template_file(unit.template, Path(unit.source).resolve().parent).resolve()
        if named != enclave_template:
            problems.append(
                Problem(
                    "beamtime.stream.template",
                    f"{unit.template!r} is not the template of enclave {deployment.enclave!r}'s "
                    f"DSN ({enclave_template.name}); drop the field or name that template",
                )
            )
    try:
        template = Template.load(enclave_template)
    except TemplateError as exc:
        problems.append(Problem("beamtime.stream.template", str(exc)))
        template = None
    ttl = int(unit.end - max(unit.start, now))
    request: dict[str, Any] = {"stream": unit.stream}
    if unit.mode is not None:
        request["mode"] = unit.mode
    if unit.encryption is not None:
        request["encryption"] = unit.encryption
    params = None
    if template is not None:
        try:
            params = template.check(request)
        except TemplateViolation as exc:
            problems.append(Problem(f"beamtime.stream.{exc.field}", exc.message))
        if ttl > template.max_lifetime_s:
            problems.append(
                Problem(
                    "beamtime.window",
                    f"the window is {ttl} s long; a channel of template {template.name!r} lives "
                    f"at most {template.max_lifetime_s} s: split the beamtime",
                )
            )

    # the tier
    tier = None
    try:
        tier = tiers.get(unit.tier)
    except SchedulerError as exc:
        problems.append(Problem("beamtime.tier", exc.message))
    if tier is not None:
        if unit.nodes > tier.max_nodes:
            problems.append(
                Problem(
                    "beamtime.nodes",
                    f"{unit.nodes} nodes is over tier {tier.name!r}'s maximum of {tier.max_nodes}",
                )
            )
        if unit.end - unit.start > tier.max_walltime_s:
            problems.append(
                Problem(
                    "beamtime.window",
                    f"{int(unit.end - unit.start)} s is over tier {tier.name!r}'s walltime limit "
                    f"of {tier.max_walltime_s} s (the analysis runs for the whole window)",
                )
            )

    # the analysis
    try:
        finder = PeakFinderParams.create(unit.finder)
    except ParamError as exc:
        problems.append(Problem(f"beamtime.analysis.finder.{exc.field}", exc.message))
        finder = None

    # the maintenance calendar and the project's other windows
    for m in book.maintenance.conflicts(unit.start, unit.end):
        problems.append(
            Problem(
                "beamtime.window",
                f"overlaps maintenance {m.id} {m.what!r} ({_fmt(m.start)} to {_fmt(m.end)}), "
                f"which takes down {', '.join(sorted(set(m.down) & BEAMTIME_NEEDS))}; "
                "move the window",
            )
        )
    for w in book.list(unit.project, None, now):
        if w.status in ("requested", "approved") and w.start < unit.end and w.end > unit.start:
            problems.append(
                Problem(
                    "beamtime.window",
                    f"overlaps window {w.id} of project {unit.project!r} ({w.status}, "
                    f"{_fmt(w.start)} to {_fmt(w.end)})",
                )
            )

    steps = out.steps
    decide = "approve it" if approve else "an admin approves it (`beamhub scheduler reservation`)"
    steps.append(
        f"request a {unit.tier!r} window for project {unit.project!r}: {_fmt(unit.start)} to "
        f"{_fmt(unit.end)}, {unit.nodes} node(s); {decide}"
    )
    if params is not None:
        steps.append(
            f"when the window opens: create channel {params.stream!r} (mode {params.mode}, "
            f"encryption {'on' if params.encryption else 'off'}, template {template.name!r}), "
            "living until the window ends"
        )
    if finder is not None:
        changed = {k: v for k, v in finder.to_dict().items() if k in unit.finder}
        steps.append(
            f"when the window opens: submit the analysis job at tier {unit.tier!r} on "
            f"{unit.nodes} node(s): {unit.workers} worker(s) on the channel's work stream, "
            f"peak finder {changed or 'defaults'}"
        )
    if unit.dashboard:
        steps.append("the project's shared dashboard shows the channel (its URL is recorded)")
    return out
