"""Project roles and the token scopes each may hold: the names every service checks against."""

from __future__ import annotations

__all__ = ["KNOWN_SCOPES", "ROLES", "ROLE_SCOPES", "STEER_ROLES", "rank", "scopes_for"]

#: Project roles, strongest first. pi/operator may steer; member may analyse; viewer only watches.
ROLES = ("pi", "operator", "member", "viewer")

#: Roles whose members may steer the instrument and manage the project's channels.
STEER_ROLES = ("pi", "operator")

#: Token scopes each project role may hold (a user mints any subset of these, never more).
ROLE_SCOPES: dict[str, tuple[str, ...]] = {
    "pi": ("stream.read", "stream.publish", "steer", "reserve", "jobs", "dashboard"),
    "operator": ("stream.read", "stream.publish", "steer", "reserve", "jobs", "dashboard"),
    "member": ("stream.read", "stream.publish", "jobs", "dashboard"),
    "viewer": ("stream.read", "dashboard"),
}

#: Every scope a project token may carry.
KNOWN_SCOPES = frozenset(
    {"stream.read", "stream.publish", "stream.admin", "steer", "reserve", "jobs", "dashboard"}
)


def scopes_for(role: str) -> tuple[str, ...]:
    """The scopes a project role may hold; none for an unknown role."""
    return ROLE_SCOPES.get(role, ())


def rank(role: str) -> int:
    """0 for the strongest role (pi); unknown roles sort after viewer."""
    return ROLES.index(role) if role in ROLES else len(ROLES)
