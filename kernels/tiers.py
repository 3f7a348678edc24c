"""QoS tiers as data: the tiers, their limits and which tier may preempt which.

Which tier a given user's job runs at right now is :mod:`beamhub.kernels.tier_policy`'s decision;
this module knows nothing of projects or beamtime windows, so both of those can import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from beamhub.kernels.scheduler import JobSpec, SchedulerError

__all__ = [
    "DEFAULT_TIERS",
    "DEFAULT_TIERS_PATH",
    "Tier",
    "TierSet",
    "load_tiers",
]

DEFAULT_TIERS_PATH = Path(__file__).with_name("tiers.yaml")
PREEMPT_MODES = ("requeue", "cancel")


@dataclass(frozen=True)
class Tier:
    """One QoS tier. ``preempt_mode``/``grace_s`` apply to jobs *of this tier* when preempted."""

    name: str
    priority: int
    preempts: tuple[str, ...] = ()
    preempt_mode: Literal["requeue", "cancel"] = "cancel"
    grace_s: float = 5.0
    max_walltime_s: int = 86400
    max_nodes: int = 1
    window_only: bool = False

    def can_preempt(self, other: Tier) -> bool:
        """True when a job of this tier may stop a running job of ``other``: never an equal or
        higher tier, whatever the configuration says."""
        return other.name in self.preempts and other.priority < self.priority

    def check_spec(self, spec: JobSpec) -> None:
        """Refuse a job that asks for more than this tier allows."""
        if spec.walltime_s > self.max_walltime_s:
            raise SchedulerError(
                f"walltime_s={spec.walltime_s} is over tier {self.name!r}'s maximum of "
                f"{self.max_walltime_s} s; ask for less or use a tier with a longer limit",
                field="walltime_s",
            )
        if spec.nodes > self.max_nodes:
            raise SchedulerError(
                f"nodes={spec.nodes} is over tier {self.name!r}'s maximum of {self.max_nodes}; "
                "ask for fewer nodes",
                field="nodes",
            )


@dataclass(frozen=True)
class TierSet:
    """The configured tiers by name, plus the tier a request without one gets."""

    tiers: Mapping[str, Tier]
    default_tier: str = "interactive"
    _order: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.tiers:
            raise SchedulerError("at least one tier must be configured", field="tiers")
        if self.default_tier not in self.tiers:
            raise SchedulerError(
                f"default_tier {self.default_tier!r} is not a configured tier "
                f"({', '.join(self.tiers)})",
                field="default_tier",
            )
        for tier in self.tiers.values():
            for target in tier.preempts:
                if target not in self.tiers:
                    raise SchedulerError(
                        f"tier {tier.name!r} preempts unknown tier {target!r}", field="preempts"
                    )
                if self.tiers[target].priority >= tier.priority:
                    raise SchedulerError(
                        f"tier {tier.name!r} (priority {tier.priority}) cannot preempt "
                        f"{target!r} (priority {self.tiers[target].priority}): only lower tiers",
                        field="preempts",
                    )
        order = sorted(self.tiers, key=lambda n: -self.tiers[n].priority)
        object.__setattr__(self, "_order", tuple(order))

    def __getitem__(self, name: str) -> Tier:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.tiers

    def __iter__(self):
        return (self.tiers[n] for n in self._order)

    def names(self) -> list[str]:
        """Tier names, highest priority first."""
        return list(self._order)

    def get(self, name: str) -> Tier:
        """The tier called ``name``; an unknown name is refused with the list of known ones."""
        try:
            return self.tiers[name]
        except KeyError:
            raise SchedulerError(
                f"unknown tier {name!r}; known tiers: {', '.join(self._order)}", field="tier"
            ) from None

    def preemptible(self) -> set[str]:
        """Names of tiers that some other tier may preempt."""
        return {t for tier in self.tiers.values() for t in tier.preempts}


def _tier_from_dict(name: str, data: Mapping[str, Any]) -> Tier:
    allowed = set(Tier.__dataclass_fields__) - {"name"}
    unknown = set(data) - allowed
    if unknown:
        raise SchedulerError(
            f"tier {name!r}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}",
            field=f"tiers.{name}",
        )
    if "priority" not in data:
        raise SchedulerError(f"tier {name!r}: priority is required", field=f"tiers.{name}")
    mode = data.get("preempt_mode", "cancel")
    if mode not in PREEMPT_MODES:
        raise SchedulerError(
            f"tier {name!r}: preempt_mode must be one of {PREEMPT_MODES}, got {mode!r}",
            field=f"tiers.{name}.preempt_mode",
        )
    try:
        return Tier(
            name=name,
            priority=int(data["priority"]),
            preempts=tuple(str(t) for t in data.get("preempts") or ()),
            preempt_mode=mode,
            grace_s=float(data.get("grace_s", 5.0)),
            max_walltime_s=int(data.get("max_walltime_s", 86400)),
            max_nodes=int(data.get("max_nodes", 1)),
            window_only=bool(data.get("window_only", False)),
        )
    except (TypeError, ValueError) as exc:
        raise SchedulerError(f"tier {name!r}: {exc}", field=f"tiers.{name}") from exc


def load_tiers(source: str | Path | Mapping[str, Any] | None = None) -> TierSet:
    """Tiers from a YAML file, a mapping like tiers.yaml's, or the packaged defaults."""
    if source is None or isinstance(source, str | Path):
        path = Path(source) if source is not None else DEFAULT_TIERS_PATH
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SchedulerError(f"cannot read tiers from {path}: {exc}") from exc
    else:
        data = source
    if not isinstance(data, Mapping) or not isinstance(data.get("tiers"), Mapping):
        raise SchedulerError("tier configuration needs a 'tiers:' mapping of name → settings")
    tiers = {str(n): _tier_from_dict(str(n), d or {}) for n, d in data["tiers"].items()}
    return TierSet(tiers, str(data.get("default_tier", "interactive")))


DEFAULT_TIERS: TierSet = load_tiers()
