"""Project roles and the token scopes each may hold: the names every service checks against."""

from __future__ import annotations

__all__ = [
    "ADMIN_MAX_TTL",
    "ADMIN_SCOPE",
    "FACILITY_SCOPES",
    "KNOWN_SCOPES",
    "METRICS_SCOPE",
    "ROLES",
    "ROLE_SCOPES",
    "STEER_ROLES",
    "rank",
    "scopes_for",
]

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

#: A facility admin's power (approve beamtime windows, anything the gateway's policy grants the
#: ``admin`` role). A token carries it only if a hub admin asked for it by name; it is never part
#: of a server's delegated token, and it lives at most :data:`ADMIN_MAX_TTL` seconds. Services
#: grant admin power from this scope, never from the token's subject alone.
ADMIN_SCOPE = "admin"
#: Read the gateway's Prometheus metrics (``/metrics``) from anywhere; minted for hub admins only.
METRICS_SCOPE = "metrics"
#: Scopes no project role holds: only hub admins may ask for them, by name.
FACILITY_SCOPES = frozenset({ADMIN_SCOPE, METRICS_SCOPE})
#: The longest lifetime of a token that carries :data:`ADMIN_SCOPE`, in seconds.
ADMIN_MAX_TTL = 300

#: Every scope a project token may carry.
KNOWN_SCOPES = frozenset(
    {"stream.read", "stream.publish", "stream.admin", "steer", "reserve", "jobs", "dashboard"}
    | FACILITY_SCOPES
)


def scopes_for(role: str) -> tuple[str, ...]:
    """The scopes a project role may hold; none for an unknown role."""
    return ROLE_SCOPES.get(role, ())


def rank(role: str) -> int:
    """0 for the strongest role (pi); unknown roles sort after viewer."""
    return ROLES.index(role) if role in ROLES else len(ROLES)
