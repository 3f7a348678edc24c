"""Enclave profiles as data, and the check that tells a deployment what to change to move up."""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from beamhub.hub.gateway.ratelimit import Limit

__all__ = [
    "ENCLAVE_DIR",
    "ENCLAVE_NAMES",
    "PACKAGE_ROOT",
    "EnclaveError",
    "EnclaveProfile",
    "Requirement",
    "check_deployment",
    "load_profile",
    "parse_profile",
    "resolve_path",
]

ENCLAVE_DIR = Path(__file__).with_name("enclaves")
#: The folder that holds auth/, hub/, streaming/, ...: the checkout in an editable install,
#: site-packages/beamhub from a wheel (setup.py keeps the folders' names), so a shipped file has
#: the same package-relative name in both, e.g. ``streaming/templates/moderate.yaml``.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
ENCLAVE_NAMES = ("dev", "open", "moderate", "leadership")
_FIELDS = {
    "name",
    "description",
    "mfa_required",
    "max_token_ttl",
    "dsn_modes",
    "encryption_required",
    "embedded_identity_allowed",
    "rate_limits",
    "audit_required",
    "audit_fsync",
    "qos_tiers",
    "dsn_template",
    "separation_of_duties",
}
_MODES = ("l4", "l7")
_FSYNC = ("always", "interval", "never")


class EnclaveError(ValueError):
    """A profile that cannot be used; the message names the file and field."""


@dataclass(frozen=True)
class EnclaveProfile:
    """What an enclave demands of a deployment (see ``hub/enclaves/dev.yaml`` for each field)."""

    name: str
    description: str
    mfa_required: bool
    max_token_ttl: int
    dsn_modes: tuple[str, ...]
    encryption_required: bool
    embedded_identity_allowed: bool
    rate_per_token: Limit
    rate_per_project: Limit
    audit_required: bool
    audit_fsync: str
    qos_tiers: tuple[str, ...]
    #: the DSN channel template a deployment of this enclave gets unless it names a stricter one
    dsn_template: str = "streaming/templates/default.yaml"
    #: the approver of a beamtime window must not be the one who requested it
    separation_of_duties: bool = False


def load_profile(name_or_path: str | os.PathLike) -> EnclaveProfile:
    """A shipped profile by name (dev, open, moderate, leadership) or a profile file's path."""
    text = str(name_or_path)
    path = ENCLAVE_DIR / f"{text}.yaml" if text in ENCLAVE_NAMES else Path(text)
    if not path.exists():
        raise EnclaveError(
            f"unknown enclave {text!r}: use one of {', '.join(ENCLAVE_NAMES)} or a profile file"
        )
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EnclaveError(f"{path}: not valid YAML: {exc}") from exc
    return parse_profile(doc, str(path))


def parse_profile(doc: Any, where: str = "profile") -> EnclaveProfile:
    """Validate a parsed profile; every error names the field and what it must be."""
    if not isinstance(doc, Mapping):
        raise EnclaveError(f"{where}: a profile is a mapping of {sorted(_FIELDS)}")
    unknown, missing = (
        set(doc) - _FIELDS,
        _FIELDS
        - set(doc)
        - {
            "description",
            "dsn_template",
            "separation_of_duties",
        },
    )
    if unknown:
        raise EnclaveError(f"{where}: unknown field(s) {sorted(unknown)}")
    if missing:
        raise EnclaveError(f"{where}: missing field(s) {sorted(missing)}")

    def boolean(name: str) -> bool:
        if not isinstance(doc[name], bool):
            raise EnclaveError(f"{where}: field {name!r} must be true or false")
        return doc[name]

    def names(name: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
        value = doc[name]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise EnclaveError(f"{where}: field {name!r} must be a non-empty list of names")
        bad = [v for v in value if allowed is not None and v not in allowed]
        if bad:
            raise EnclaveError(f"{where}: field {name!r}: {bad} not in {list(allowed or ())}")
        return tuple(value)

    ttl = doc["max_token_ttl"]
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 60:
        raise EnclaveError(f"{where}: field 'max_token_ttl' must be whole seconds >= 60")
    if doc["audit_fsync"] not in _FSYNC:
        raise EnclaveError(f"{where}: field 'audit_fsync' must be one of {list(_FSYNC)}")
    limits = doc["rate_limits"]
    if not isinstance(limits, Mapping) or set(limits) != {"per_token", "per_project"}:
        raise EnclaveError(f"{where}: field 'rate_limits' needs exactly per_token and per_project")
    parsed = {}
    for key in ("per_token", "per_project"):
        value = limits[key]
        if not isinstance(value, Mapping) or set(value) != {"rate", "burst"}:
            raise EnclaveError(f"{where}: field 'rate_limits.{key}' must be {{rate, burst}}")
        try:
            parsed[key] = Limit(float(value["rate"]), value["burst"])
        except (TypeError, ValueError) as exc:
            raise EnclaveError(f"{where}: field 'rate_limits.{key}': {exc}") from exc
    name = doc["name"]
    if not isinstance(name, str) or not name:
        raise EnclaveError(f"{where}: field 'name' must be the enclave's name")
    return EnclaveProfile(
        name=name,
        description=str(doc.get("description", "")),
        mfa_required=boolean("mfa_required"),
        max_token_ttl=ttl,
        dsn_modes=names("dsn_modes", _MODES),
        encryption_required=boolean("encryption_required"),
        embedded_identity_allowed=boolean("embedded_identity_allowed"),
        rate_per_token=parsed["per_token"],
        rate_per_project=parsed["per_project"],
        audit_required=boolean("audit_required"),
        audit_fsync=doc["audit_fsync"],
        qos_tiers=names("qos_tiers"),
        dsn_template=str(doc.get("dsn_template") or "streaming/templates/default.yaml"),
        separation_of_duties=bool(doc.get("separation_of_duties", False)),
    )


@dataclass(frozen=True)
class Requirement:
    """One line of ``beamhub check``: what the enclave asks, what the deployment has, the fix."""

    name: str
    required: str
    actual: str
    ok: bool
    fix: str = ""


def resolve_path(path: str | os.PathLike, base: Path | None = None) -> Path:
    """A file named in beamhub.yaml (a template, tiers): absolute, or the first that exists of
    ``base`` (the beamhub.yaml's folder) / path, the working directory / path, and
    :data:`PACKAGE_ROOT` / path (a shipped file, e.g. ``streaming/templates/moderate.yaml``).

    A name found nowhere resolves against ``base`` (else the working directory), so the error
    that follows names the place the user most likely meant.
    """
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    for root in (base, Path.cwd(), PACKAGE_ROOT):
        if root is not None and (root / candidate).exists():
            return root / candidate
    return (base or Path.cwd()) / candidate


def check_deployment(
    dep: Any, target: EnclaveProfile, base: Path | None = None
) -> list[Requirement]:
    """Each requirement of ``target`` against a loaded :class:`beamhub.hub.deployment.Deployment`."""
    current = load_profile(dep.enclave) if dep.enclave in ENCLAVE_NAMES else target
    out: list[Requirement] = []

    mfa = dep.identity.require_mfa
    mfa_on = current.mfa_required if mfa is None else bool(mfa)
    if target.mfa_required:
        out.append(
            Requirement(
                "mfa",
                "logins must assert a second factor",
                "required" if mfa_on else "not required",
                mfa_on,
                "set identity.require_mfa: true (or enclave: " + target.name + ")",
            )
        )
    embedded = dep.identity.provider == "embedded"
    if not target.embedded_identity_allowed:
        out.append(
            Requirement(
                "identity",
                "the facility's OpenID provider",
                "embedded dev IdP" if embedded else dep.identity.provider,
                not embedded,
                "set identity.provider to the facility issuer's https URL with authorize_url, "
                "token_url, userdata_url and client_secret",
            )
        )
    cap = dep.tokens.max_ttl if dep.tokens.max_ttl is not None else current.max_token_ttl
    cap = min(cap, current.max_token_ttl)
    worst = max(cap, dep.tokens.ttl)
    out.append(
        Requirement(
            "token_ttl",
            f"project tokens live <= {target.max_token_ttl} s",
            f"tokens.ttl {dep.tokens.ttl} s, mint cap {cap} s",
            worst <= target.max_token_ttl,
            f"set tokens.max_ttl: {target.max_token_ttl} and tokens.ttl <= {target.max_token_ttl}",
        )
    )

    from beamhub.streaming.template import (
        Template,  # the DSN's admin template says modes/encryption
    )

    # the deployment's template, else the one its own enclave's profile brings
    named = dep.dsn.template or current.dsn_template
    try:
        template = Template.load(resolve_path(named, base))
        where = str(named) + ("" if dep.dsn.template else f" (the {current.name} enclave's)")
    except (OSError, ValueError) as exc:
        out.append(
            Requirement(
                "dsn_template",
                "a readable DSN template",
                f"{exc}",
                False,
                "fix dsn.template (see streaming/templates/)",
            )
        )
        template = None
    if template is not None and dep.dsn.enabled:
        bad = [m for m in template.modes if m not in target.dsn_modes]
        out.append(
            Requirement(
                "dsn_modes",
                f"only {list(target.dsn_modes)}",
                f"{list(template.modes)} ({where})",
                not bad,
                f"use a DSN template with modes: {list(target.dsn_modes)}, e.g. "
                f"dsn.template: streaming/templates/moderate.yaml",
            )
        )
        if target.encryption_required:
            enc = bool(template.encryption_required)
            out.append(
                Requirement(
                    "encryption",
                    "CURVE on every data-plane channel",
                    f"{'required' if enc else 'optional'} ({where})",
                    enc,
                    "use a DSN template with encryption_required: true "
                    "(streaming/templates/moderate.yaml)",
                )
            )

    if target.separation_of_duties:
        out.append(
            Requirement(
                "separation_of_duties",
                "the approver of a beamtime window is not its requester",
                "enforced" if current.separation_of_duties else f"not enforced in {current.name}",
                current.separation_of_duties,
                f"set enclave: {target.name} (its gateway refuses a requester's own approval)",
            )
        )

    gw = dep.gateway
    for label, rate, burst, limit in (
        ("rate_limit_token", gw.rate_per_s, gw.burst, target.rate_per_token),
        ("rate_limit_project", gw.project_rate_per_s, gw.project_burst, target.rate_per_project),
    ):
        inherit = not rate and not burst
        ok = inherit or (0 < rate <= limit.rate and 0 < burst <= limit.burst)
        actual = "the enclave's value" if inherit else f"{rate:g}/s burst {burst}"
        prefix = "gateway." + ("" if label.endswith("token") else "project_")
        out.append(
            Requirement(
                label,
                f"<= {limit.rate:g}/s, burst <= {limit.burst}",
                actual,
                ok,
                f"set {prefix}rate_per_s/{prefix}burst within the limit, or 0 for the enclave's value",
            )
        )
    if target.audit_required:
        out.append(
            Requirement(
                "audit",
                "every decision in the hash-chained audit log (gateway on)",
                "gateway on" if gw.enabled else "gateway off",
                bool(gw.enabled),
                "set gateway.enabled: true",
            )
        )

    tenancy = getattr(dep, "tenancy", None)
    if tenancy is not None:
        isolated = tenancy.resolved() == "account"
        if isolated:
            actual = f"each user her own account ({tenancy.account}), " + (
                "in a bubblewrap sandbox" if tenancy.sandbox else "without a sandbox"
            )
        else:
            actual = (
                f"not isolated: every user's server and jobs run as {getpass.getuser()}, who "
                "can read the hub's secrets and every user's files"
            )
        out.append(
            Requirement(
                "tenancy",
                "each user's code as her own Unix account, sandboxed (dev may run as yourself)",
                actual,
                (isolated and bool(tenancy.sandbox)) or target.name == "dev",
                "run `beamhub up` as root with tenancy.run_as: auto (or account) and "
                "tenancy.sandbox: true",
            )
        )

    from beamhub.kernels.tiers import DEFAULT_TIERS, load_tiers

    tiers_path = getattr(dep.scheduler, "tiers", "") or ""
    tiers = load_tiers(resolve_path(tiers_path, base)) if tiers_path else DEFAULT_TIERS
    extra = [t for t in tiers.names() if t not in target.qos_tiers]
    out.append(
        Requirement(
            "qos_tiers",
            f"only {list(target.qos_tiers)}",
            str(tiers.names()),
            not extra,
            f"remove tier(s) {extra} from the scheduler's tiers file",
        )
    )
    return out
