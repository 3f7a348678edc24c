"""Projects grant QoS tiers; their members inherit them — the facility's allocation model."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from beamhub.kernels.scheduler import SchedulerError
from beamhub.kernels.tiers import DEFAULT_TIERS, TierSet

__all__ = ["Project", "ProjectDirectory"]


@dataclass(frozen=True)
class Project:
    """A project (proposal/allocation): the tiers it grants and who belongs to it."""

    name: str
    tiers: tuple[str, ...]
    members: frozenset[str]


class ProjectDirectory:
    """Who is in which project and which tiers each project grants.

    A member holds exactly the tiers their project grants. ``window_only`` tiers (beamtime)
    cannot be granted here: they come from an approved window in the ReservationBook.
    """

    def __init__(self, projects: Iterable[Project], tiers: TierSet | None = None) -> None:
        self.tier_set = tiers or DEFAULT_TIERS
        self._projects: dict[str, Project] = {}
        for project in projects:
            self._add(project)

    def _add(self, project: Project) -> None:
        if not project.name:
            raise SchedulerError("project name must not be empty", field="projects")
        if project.name in self._projects:
            raise SchedulerError(f"project {project.name!r} is defined twice", field="projects")
        for name in project.tiers:
            tier = self.tier_set.get(name)  # unknown tier → clear error
            if tier.window_only:
                raise SchedulerError(
                    f"project {project.name!r} grants {name!r}, a window-only tier; it is held "
                    "only inside an approved beamtime window (beamhub scheduler reservation)",
                    field=f"projects.{project.name}.tiers",
                )
        self._projects[project.name] = project

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], tiers: TierSet | None = None) -> ProjectDirectory:
        """From ``{"projects": {name: {"tiers": [...], "members": [...]}}}``."""
        entries = data.get("projects") if isinstance(data, Mapping) else None
        if not isinstance(entries, Mapping):
            raise SchedulerError("project configuration needs a 'projects:' mapping")
        projects = []
        for name, entry in entries.items():
            entry = entry or {}
            if not isinstance(entry, Mapping):
                raise SchedulerError(f"project {name!r} must be a mapping", field="projects")
            unknown = set(entry) - {"tiers", "members"}
            if unknown:
                raise SchedulerError(
                    f"project {name!r}: unknown field(s) {sorted(unknown)}; allowed: members, tiers",
                    field=f"projects.{name}",
                )
            projects.append(
                Project(
                    name=str(name),
                    tiers=tuple(str(t) for t in entry.get("tiers") or ()),
                    members=frozenset(str(m) for m in entry.get("members") or ()),
                )
            )
        return cls(projects, tiers)

    @classmethod
    def from_yaml(cls, path: str | Path, tiers: TierSet | None = None) -> ProjectDirectory:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise SchedulerError(f"cannot read projects from {path}: {exc}") from exc
        return cls.from_dict(data or {}, tiers)

    def get(self, project: str) -> Project:
        try:
            return self._projects[project]
        except KeyError:
            raise SchedulerError(
                f"unknown project {project!r}; known projects: {', '.join(sorted(self._projects))}",
                status=404,
                field="project",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._projects)

    def projects_of(self, user: str) -> list[str]:
        """The projects a user is a member of."""
        return sorted(p.name for p in self._projects.values() if user in p.members)

    def tiers_for(self, user: str, project: str) -> list[str]:
        """Tiers the user inherits from the project; refused if they are not a member."""
        entry = self.get(project)
        if user not in entry.members:
            theirs = ", ".join(self.projects_of(user)) or "none"
            raise SchedulerError(
                f"user {user!r} is not a member of project {project!r} (their projects: "
                f"{theirs}); ask the project's PI to add them",
                status=403,
                field="project",
            )
        return list(entry.tiers)
