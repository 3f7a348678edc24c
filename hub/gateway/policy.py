"""Policy as code: versioned YAML rules evaluated per request, deny by default, decisions explained."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ACTIONS",
    "DEFAULT_POLICY_PATH",
    "POLICY_VERSION",
    "Decision",
    "Policy",
    "PolicyError",
    "PolicyRequest",
    "Rule",
    "load_policy",
]

POLICY_VERSION = 1
DEFAULT_POLICY_PATH = Path(__file__).with_name("policies") / "default.yaml"

#: Every action the gateway asks about; a rule naming another action is a typo.
ACTIONS = frozenset(
    {
        "status.read",
        "token.read",
        "channels.create",
        "channels.read",
        "channels.renew",
        "channels.delete",
        "steer",
        "jobs.submit",
        "jobs.read",
        "jobs.cancel",
        "reservations.request",
        "reservations.read",
        "reservations.approve",
        "maintenance.read",
        "maintenance.manage",
        "config.reload",
    }
)
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RULE_KEYS = {
    "id",
    "description",
    "effect",
    "who",
    "project",
    "scope",
    "actions",
    "enclave",
    "time",
    "source",
}
_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file, rule and field."""


@dataclass(frozen=True)
class PolicyRequest:
    """What one request asks: who (from the verified token), for which project, to do what."""

    action: str
    user: str | None = None
    token_project: str | None = None
    project: str | None = None
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    enclave: str | None = None
    source: str | None = None
    at: datetime | None = None
    resource: str = ""


@dataclass(frozen=True)
class Decision:
    """The outcome: allowed or not, which rule decided, and why, in words a user can act on."""

    allow: bool
    rule: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": "allow" if self.allow else "deny",
            "rule": self.rule,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class TimeWindow:
    """Weekdays and a daily UTC window [start, end); end before start wraps past midnight."""

    days: frozenset[int]
    start: time
    end: time

    def contains(self, at: datetime) -> bool:
        at = at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)
        if at.weekday() not in self.days:
            return False
        now = at.time().replace(tzinfo=None)
        if self.start <= self.end:
            return self.start <= now < self.end
        return now >= self.start or now < self.end

    def describe(self) -> str:
        days = ",".join(_DAYS[d] for d in sorted(self.days))
        return f"{days} {self.start:%H:%M}-{self.end:%H:%M} UTC"


@dataclass(frozen=True)
class Rule:
    """One rule; every condition given must hold for the rule to match."""

    id: str
    effect: str
    actions: tuple[str, ...]
    users: frozenset[str] | None = None
    roles: frozenset[str] | None = None
    project: str | frozenset[str] = "any"
    scopes: frozenset[str] = frozenset()
    enclaves: frozenset[str] | None = None
    window: TimeWindow | None = None
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    description: str = ""

    def covers(self, action: str) -> bool:
        return any(fnmatch.fnmatchcase(action, pattern) for pattern in self.actions)

    def mismatch(self, req: PolicyRequest, at: datetime) -> str | None:
        """None if the rule matches ``req`` (whose action it covers); else the first condition
        that failed, in words."""
        if self.users is not None or self.roles is not None:
            if req.user is None:
                return "needs an authenticated user (send a project token)"
            by_user = self.users is not None and req.user in self.users
            by_role = self.roles is not None and bool(self.roles & req.roles)
            if not (by_user or by_role):
                wanted = sorted(self.roles or ()) or sorted(self.users or ())
                what = "one of the roles" if self.roles else "one of the users"
                return f"user {req.user!r} is not {what} {wanted}"
        if self.project == "own":
            if req.token_project is None or req.project != req.token_project:
                return (
                    f"the token is for project {req.token_project!r}, "
                    f"not {req.project!r}; use a token of that project"
                )
        elif isinstance(self.project, frozenset) and req.project not in self.project:
            return f"project {req.project!r} is not in {sorted(self.project)}"
        missing = self.scopes - req.scopes
        if missing:
            return f"the token lacks scope {' '.join(sorted(missing))!r}"
        if self.enclaves is not None and req.enclave not in self.enclaves:
            return f"enclave {req.enclave!r} is not in {sorted(self.enclaves)}"
        if self.window is not None and not self.window.contains(at):
            return f"outside the time window {self.window.describe()}"
        if self.networks is not None:
            try:
                addr = ipaddress.ip_address(req.source or "")
            except ValueError:
                return f"source address {req.source!r} is unknown or invalid"
            if not any(addr in net for net in self.networks):
                nets = [str(n) for n in self.networks]
                return f"source {req.source} is not in the allowed networks {nets}"
        return None


class Policy:
    """An ordered rule set. A matching deny rule always wins; else a matching allow; else deny."""

    def __init__(
        self,
        rules: Iterable[Rule],
        version: int = POLICY_VERSION,
        source: str = "",
        tests: Iterable[Any] = (),
    ) -> None:
        self.rules = tuple(rules)
        self.version = version
        self.source = source
        #: the file's own test cases as written; :mod:`beamhub.hub.gateway.policy_tests` reads
        #: and runs them
        self.tests = tuple(tests)
        # per action, the rules that cover it, in order: evaluation skips the glob matching
        self._by_action = {a: tuple(r for r in self.rules if r.covers(a)) for a in ACTIONS}

    def evaluate(self, req: PolicyRequest) -> Decision:
        at = req.at or datetime.now(UTC)
        allow: Rule | None = None
        nearest: tuple[Rule, str] | None = None
        rules = self._by_action.get(req.action)
        if rules is None:
            rules = tuple(r for r in self.rules if r.covers(req.action))
        for rule in rules:
            why_not = rule.mismatch(req, at)
            if why_not is None:
                if rule.effect == "deny":
                    reason = rule.description or f"denied by rule {rule.id!r}"
                    return Decision(False, rule.id, reason)
                allow = allow or rule
            elif rule.effect == "allow" and nearest is None:
                nearest = (rule, why_not)
        if allow is not None:
            return Decision(True, allow.id, allow.description or f"allowed by rule {allow.id!r}")
        if nearest is not None:
            rule, why_not = nearest
            reason = f"no rule allows {req.action!r}; nearest rule {rule.id!r}: {why_not}"
        else:
            reason = f"no rule allows {req.action!r} (deny by default)"
        return Decision(False, "default-deny", reason)


# --- loading and validation -------------------------------------------------------------------


def load_policy(path: str | Path | None = None) -> Policy:
    """Read and validate a policy file (default: the shipped ``policies/default.yaml``)."""
    path = Path(path) if path else DEFAULT_POLICY_PATH
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from exc
    return parse_policy(doc, str(path))


def parse_policy(doc: Any, where: str = "policy") -> Policy:
    """Validate a parsed policy document; every error names the rule and field to fix."""
    if not isinstance(doc, Mapping):
        raise PolicyError(f"{where}: expected a mapping with 'version' and 'rules'")
    unknown = set(doc) - {"version", "rules", "description", "tests"}
    if unknown:
        raise PolicyError(f"{where}: unknown top-level field(s) {sorted(unknown)}")
    if doc.get("version") != POLICY_VERSION:
        raise PolicyError(
            f"{where}: field 'version' is {doc.get('version')!r}; this gateway reads version "
            f"{POLICY_VERSION} (add 'version: {POLICY_VERSION}')"
        )
    raw_rules = doc.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise PolicyError(f"{where}: field 'rules' must be a non-empty list")
    rules, seen = [], set()
    for i, raw in enumerate(raw_rules):
        rule = _parse_rule(raw, f"{where}: rules[{i}]")
        if rule.id in seen:
            raise PolicyError(f"{where}: rules[{i}]: duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        rules.append(rule)
    tests = doc.get("tests") or ()
    if not isinstance(tests, list | tuple):
        raise PolicyError(f"{where}: field 'tests' must be a list of cases")
    return Policy(rules, POLICY_VERSION, where, tests)


def _str_list(value: Any, where: str, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise PolicyError(
            f"{where}: field {name!r} must be a string or a non-empty list of strings"
        )
    return value


def _parse_rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: a rule must be a mapping")
    rid = raw.get("id")
    if not isinstance(rid, str) or not _ID_RE.match(rid):
        raise PolicyError(f"{where}: field 'id' must be a short lowercase name, e.g. members-read")
    where = f"{where} (id {rid})"
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise PolicyError(
            f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_RULE_KEYS)}"
        )
    effect = raw.get("effect")
    if effect not in ("allow", "deny"):
        raise PolicyError(f"{where}: field 'effect' must be 'allow' or 'deny', not {effect!r}")
    actions = tuple(_str_list(raw.get("actions"), where, "actions"))
    for pattern in actions:
        if not any(fnmatch.fnmatchcase(a, pattern) for a in ACTIONS):
            raise PolicyError(
                f"{where}: field 'actions': {pattern!r} matches no action; known: {sorted(ACTIONS)}"
            )
    users = roles = None
    who = raw.get("who", "any")
    if who != "any":
        if not isinstance(who, Mapping) or not who or set(who) - {"users", "roles"}:
            raise PolicyError(
                f"{where}: field 'who' must be 'any' or a mapping of users/roles lists"
            )
        if "users" in who:
            users = frozenset(_str_list(who["users"], where, "who.users"))
        if "roles" in who:
            roles = frozenset(_str_list(who["roles"], where, "who.roles"))
    project: str | frozenset[str] = raw.get("project", "any")
    if project not in ("own", "any"):
        project = frozenset(_str_list(project, where, "project"))
    scopes = frozenset(_str_list(raw["scope"], where, "scope")) if "scope" in raw else frozenset()
    enclaves = frozenset(_str_list(raw["enclave"], where, "enclave")) if "enclave" in raw else None
    window = _parse_window(raw["time"], where) if "time" in raw else None
    networks = None
    if "source" in raw:
        nets = []
        for text in _str_list(raw["source"], where, "source"):
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError as exc:
                raise PolicyError(f"{where}: field 'source': {text!r} is not a CIDR") from exc
        networks = tuple(nets)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise PolicyError(f"{where}: field 'description' must be a string")
    return Rule(
        rid, effect, actions, users, roles, project, scopes, enclaves, window, networks, description
    )


def _parse_window(raw: Any, where: str) -> TimeWindow:
    if not isinstance(raw, Mapping) or set(raw) - {"days", "start", "end"}:
        raise PolicyError(f"{where}: field 'time' must be a mapping of days, start, end (UTC)")
    days = raw.get("days", list(_DAYS))
    try:
        day_set = frozenset(_DAYS.index(d.lower()[:3]) for d in _str_list(days, where, "time.days"))
    except ValueError as exc:
        raise PolicyError(f"{where}: field 'time.days': use names from {list(_DAYS)}") from exc

    def hhmm(name: str, default: str) -> time:
        text = str(raw.get(name, default))
        try:
            return time.fromisoformat(text) if text != "24:00" else time.max
        except ValueError as exc:
            raise PolicyError(f"{where}: field 'time.{name}' must be HH:MM, not {text!r}") from exc

    return TimeWindow(day_set, hhmm("start", "00:00"), hhmm("end", "24:00"))
