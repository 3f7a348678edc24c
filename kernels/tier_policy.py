"""The tier policy: tiers + project grants + beamtime windows → the tier a job runs at now."""

from __future__ import annotations

import time
from collections.abc import Iterable

from beamhub.kernels.projects import ProjectDirectory
from beamhub.kernels.reservations import ReservationBook
from beamhub.kernels.scheduler import JobSpec, SchedulerError
from beamhub.kernels.tiers import DEFAULT_TIERS, Tier, TierSet

__all__ = ["TierPolicy"]


class TierPolicy:
    """Tiers + project grants + beamtime windows → the tier a job runs at, or a refusal.

    Without a project directory every user may use every tier that is not ``window_only``
    (a laptop's dev setup); without a reservation book no window ever elevates.
    """

    def __init__(
        self,
        tiers: TierSet | None = None,
        projects: ProjectDirectory | None = None,
        reservations: ReservationBook | None = None,
    ) -> None:
        self.tiers = tiers or DEFAULT_TIERS
        self.projects = projects
        self.reservations = reservations

    def granted(self, user: str, project: str) -> list[str]:
        """Tiers the user holds through the project, outside any window (highest first)."""
        if self.projects is None:
            return [t.name for t in self.tiers if not t.window_only]
        held = set(self.projects.tiers_for(user, project))
        return [n for n in self.tiers.names() if n in held]

    def effective_tier(
        self, user: str, project: str, requested: str | None = None, now: float | None = None
    ) -> Tier:
        """The tier the job runs at. ``requested=None`` means "the best I may use now": the
        window's tier inside an active approved window, else the default tier (or the
        highest granted one). An explicit request is honoured when held, else refused."""
        now = time.time() if now is None else now
        if requested is not None:
            self.tiers.get(requested)  # unknown tier → clear error
        granted = self.granted(user, project)
        window = self.reservations.active(project, now) if self.reservations else None
        if requested is None:
            if window is not None:
                return self.tiers.get(window.tier)
            if self.tiers.default_tier in granted:
                return self.tiers.get(self.tiers.default_tier)
            if granted:
                return self.tiers.get(granted[0])
            raise SchedulerError(
                f"user {user!r} holds no tier in project {project!r}; ask the project's PI "
                "or an admin for a grant",
                status=403,
                field="tier",
            )
        if requested in granted or (window is not None and window.tier == requested):
            return self.tiers.get(requested)
        raise SchedulerError(
            self._refusal(user, project, requested, granted, now), status=403, field="tier"
        )

    def _refusal(
        self, user: str, project: str, requested: str, granted: Iterable[str], now: float
    ) -> str:
        held = ", ".join(granted) or "none"
        msg = (
            f"user {user!r} does not hold tier {requested!r} in project {project!r} (held: {held})"
        )
        if self.tiers.get(requested).window_only:
            msg += f"; {requested!r} is only held inside an approved beamtime window"
            upcoming = self.reservations.next_window(project, now) if self.reservations else None
            if upcoming is not None:
                msg += (
                    f"; the project's next window opens at "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(upcoming.start))}"
                )
            else:
                msg += "; request one with `beamhub scheduler reservation request`"
        else:
            msg += "; ask the project's PI or an admin to grant it"
        return msg

    def check(self, spec: JobSpec, now: float | None = None) -> Tier:
        """Validate a job spec against the policy: the tier must be held and its limits kept."""
        spec.validate()
        tier = self.effective_tier(spec.user, spec.project, spec.tier, now)
        tier.check_spec(spec)
        return tier
