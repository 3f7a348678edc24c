"""A policy file's own tests: requests with the decision each must get.

A policy's optional ``tests:`` list holds cases such as ``{action: steer, user: alice,
project: p1, scope: steer, expect: allow}``. `beamhub policy test` (without ``--action``) runs
them, and the gateway refuses to reload a policy whose cases fail, so a rule edit that would lock
out operators or let anonymous users steer never goes live. Each case takes the fields of
`beamhub policy test`: user, project, token_project (default: project), scope, roles, enclave,
source, at (ISO time), expect (allow | deny) and optionally rule (the deciding rule's id).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from beamhub.hub.gateway.policy import ACTIONS, PolicyError, PolicyRequest

__all__ = ["PolicyCase", "failures", "parse_cases"]

_CASE_KEYS = {
    "name",
    "action",
    "user",
    "project",
    "token_project",
    "scope",
    "roles",
    "enclave",
    "source",
    "at",
    "expect",
    "rule",
}


@dataclass(frozen=True)
class PolicyCase:
    """One request and the decision the policy must give it."""

    name: str
    request: Any  # PolicyRequest
    expect: str  # allow | deny
    rule: str | None = None


def _words(value: Any, where: str, name: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where}: field {name!r} must be a string or a list of strings")
    return frozenset(value)


def parse_cases(raw: Any, where: str) -> tuple[PolicyCase, ...]:
    """Validate the ``tests:`` list; every error names the case and field."""
    if not isinstance(raw, list):
        raise PolicyError(f"{where}: field 'tests' must be a list of cases")
    cases = []
    for i, case in enumerate(raw):
        at_case = f"{where}: tests[{i}]"
        if not isinstance(case, Mapping):
            raise PolicyError(f"{at_case}: a case must be a mapping")
        unknown = set(case) - _CASE_KEYS
        if unknown:
            raise PolicyError(
                f"{at_case}: unknown field(s) {sorted(unknown)}; known: {sorted(_CASE_KEYS)}"
            )
        action = case.get("action")
        if action not in ACTIONS:
            raise PolicyError(
                f"{at_case}: field 'action' {action!r} is not an action; known: {sorted(ACTIONS)}"
            )
        expect = case.get("expect")
        if expect not in ("allow", "deny"):
            raise PolicyError(f"{at_case}: field 'expect' must be 'allow' or 'deny'")
        at = None
        if case.get("at") is not None:
            try:
                at = datetime.fromisoformat(str(case["at"]))
            except ValueError:
                raise PolicyError(f"{at_case}: field 'at' must be an ISO time") from None
            at = at if at.tzinfo else at.replace(tzinfo=UTC)
        user = case.get("user")
        project = case.get("project")
        request = PolicyRequest(
            action=action,
            user=user,
            token_project=(case.get("token_project") or project) if user else None,
            project=project,
            scopes=_words(case.get("scope"), at_case, "scope"),
            roles=_words(case.get("roles"), at_case, "roles"),
            enclave=case.get("enclave", "dev"),
            source=case.get("source", "127.0.0.1"),
            at=at,
        )
        name = str(case.get("name") or f"tests[{i}] {action} by {user or 'anonymous'}")
        cases.append(PolicyCase(name, request, expect, case.get("rule")))
    return tuple(cases)


def failures(policy: Any) -> list[str]:
    """Each of the policy's cases that does not get its expected decision, in words; a malformed
    case raises :class:`~beamhub.hub.gateway.policy.PolicyError` naming it."""
    failed = []
    for case in parse_cases(list(policy.tests), policy.source or "policy"):
        decision = policy.evaluate(case.request)
        got = "allow" if decision.allow else "deny"
        if got != case.expect:
            failed.append(
                f"{case.name}: expected {case.expect}, got {got} "
                f"(rule {decision.rule}: {decision.reason})"
            )
        elif case.rule is not None and decision.rule != case.rule:
            failed.append(f"{case.name}: decided by rule {decision.rule!r}, not {case.rule!r}")
    return failed
