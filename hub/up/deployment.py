"""One `beamhub.yaml` describes a deployment; every bad field gets an error that names it."""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from beamhub.auth.roles import ROLES
from beamhub.hub.enclave import EnclaveError, EnclaveProfile, load_profile

__all__ = [
    "ENCLAVES",
    "DashboardConfig",
    "Deployment",
    "DeploymentError",
    "DetectorConfig",
    "DsnConfig",
    "GatewayConfig",
    "HubConfig",
    "IdentityConfig",
    "MaintenanceWindow",
    "SchedulerConfig",
    "TenancyConfig",
    "TokensConfig",
    "UserSpec",
    "default_deployment_path",
    "enclave_profile",
    "load_deployment",
    "tenancy_refusal",
]

ENCLAVES = ("dev", "open", "moderate", "leadership")


class DeploymentError(ValueError):
    """A bad deployment file. ``field`` is the dotted path of the offending key."""

    def __init__(self, field: str, message: str, source: str = "beamhub.yaml") -> None:
        super().__init__(f"{source}: {field}: {message}")
        self.field = field
        self.message = message
        self.source = source


def enclave_profile(name: str) -> EnclaveProfile:
    """The enclave's profile (hub/enclaves/NAME.yaml); a profile that fails to load is an error.

    Never a fallback to values in code: a broken moderate.yaml must stop `beamhub up`, not
    weaken the enclave.
    """
    if name not in ENCLAVES:
        raise DeploymentError(
            "enclave", f"unknown enclave {name!r}; use one of {', '.join(ENCLAVES)}"
        )
    try:
        return load_profile(name)
    except EnclaveError as exc:
        raise DeploymentError(
            "enclave", f"the {name} enclave's profile is unusable: {exc}"
        ) from exc


@dataclass
class HubConfig:
    ip: str = "127.0.0.1"
    port: int = 8000
    #: seconds the hub waits before refreshing a user's upstream tokens (also before each spawn)
    auth_refresh_age: int = 300


@dataclass
class UserSpec:
    username: str
    password: str = field(default="", repr=False)  # dev IdP password: never in a repr
    email: str = ""
    #: factors the user is enrolled in: "otp" = TOTP, asked by the dev IdP where MFA is required
    amr: list[str] = field(default_factory=lambda: ["pwd"])
    acr: str = ""
    #: project -> role (pi, operator, member, viewer)
    projects: dict[str, str] = field(default_factory=dict)
    admin: bool = False


@dataclass
class IdentityConfig:
    #: "embedded" runs the dev OpenID provider; otherwise the external issuer's base URL
    provider: str = "embedded"
    port: int = 0
    client_id: str = "beamhub-hub"
    client_secret: str = field(default="", repr=False)  # never in a repr
    #: for an external issuer (ignored by the embedded one, which publishes discovery)
    authorize_url: str = ""
    token_url: str = ""
    userdata_url: str = ""
    #: None = what the enclave profile says
    require_mfa: bool | None = None
    #: amr values that count as a second factor
    mfa_methods: list[str] = field(default_factory=lambda: ["otp", "mfa", "hwk", "swk", "sms"])
    users: list[UserSpec] = field(default_factory=list)


@dataclass
class TokensConfig:
    #: lifetime of a delegated (server) token, seconds; capped by the enclave's max
    ttl: int = 900
    issuer: str = "beamhub-dev"
    audience: str = "beamhub"
    #: how often verifiers poll the revocation list, seconds
    revocation_poll: float = 5.0
    #: None = the enclave's max_token_ttl
    max_ttl: int | None = None


@dataclass
class DsnConfig:
    enabled: bool = True
    port: int = 0
    data_host: str = "127.0.0.1"
    template: str = ""


@dataclass
class DetectorConfig:
    enabled: bool = True
    kind: str = "simulated"
    project: str = "p-1001"
    channel: str = "detector"
    rate_hz: float = 10.0
    shape: list[int] = field(default_factory=lambda: [256, 256])
    hit_fraction: float = 0.1
    #: seconds between the live-figure lines `beamhub up` prints (0 = off)
    print_every_s: float = 5.0


@dataclass
class SchedulerConfig:
    backend: str = "local"
    #: the local backend's virtual nodes (SLURM has its own nodes)
    nodes: int = 4

    def backend_options(self) -> dict[str, Any]:
        """``c.ReservedNodeSpawner.backend_options``: what this backend knows (SLURM reads its
        cluster from SLURM_CONF; the local backend needs its node count)."""
        return {"nodes": self.nodes} if self.backend == "local" else {}


@dataclass
class TenancyConfig:
    """Whose Unix account runs each user's server, jobs and Dask workers (decision 9)."""

    #: auto = each user's own account when `beamhub up` runs as root, else the invoking
    #: account (dev enclave only); account = always her own (needs root); self = the invoking one
    run_as: str = "auto"
    #: the Unix account of IdP user {username}; created on first use (root)
    account: str = "bh-{username}"
    #: the accounts' homes, <home_root>/<account>, 0700; "" = /home
    home_root: str = ""
    #: local backend: each job in a bubblewrap sandbox with per-node cgroup limits
    sandbox: bool = True
    #: as root, each service (IdP, DSN, proxy, tokens, dashboard, detector) runs as a system
    #: account of its own, beamhub-<service>; false = all as root (dev enclave only)
    service_accounts: bool = True

    def resolved(self, euid: int | None = None) -> str:
        """account or self, as `beamhub up` started by ``euid`` (default: this process) runs."""
        if self.run_as != "auto":
            return self.run_as
        return "account" if (os.geteuid() if euid is None else euid) == 0 else "self"

    def spawner_options(self, euid: int | None = None) -> dict[str, Any]:
        """``c.ReservedNodeSpawner`` settings (runtime.json's ``tenancy``)."""
        run_as = self.resolved(euid)
        return {
            "run_as": run_as,
            "account_template": self.account,
            "home_root": self.home_root,
            # bubblewrap starts as root and drops to her account: nothing to sandbox in 'self'
            "sandbox": self.sandbox if run_as == "account" else None,
        }


@dataclass
class MaintenanceWindow:
    #: ISO 8601 times (UTC if no zone), e.g. "2026-12-01T06:00:00Z"
    start: str = ""
    end: str = ""
    #: what is down, in words a user reads on the gateway's status
    what: str = ""


@dataclass
class GatewayConfig:
    enabled: bool = True
    policy: str = ""
    audit_log: str = ""
    #: per-token token bucket; 0 = the enclave profile's value
    rate_per_s: float = 0.0
    burst: int = 0
    #: per-project token bucket; 0 = the enclave profile's value
    project_rate_per_s: float = 0.0
    project_burst: int = 0
    #: maintenance windows listed by the gateway's public status
    maintenance: list[MaintenanceWindow] = field(default_factory=list)


@dataclass
class DashboardConfig:
    enabled: bool = True
    #: page updates per second (0.2..5); the shared subscription itself runs at the stream's rate
    update_hz: float = 2.0
    #: side of the downsampled detector image shown, pixels
    image_px: int = 96
    #: peak-finder settings of the dashboard's own analysis ({} = the peak finder's defaults)
    analysis: dict[str, float] = field(default_factory=dict)


@dataclass
class MonitoringConfig:
    """A real Prometheus under `beamhub up` (:mod:`beamhub.hub.up.monitoring`); off by default."""

    enabled: bool = False
    #: its web UI and HTTP API on 127.0.0.1 (0 = any free port, kept in ports.json)
    port: int = 0
    scrape_interval_s: float = 15.0
    #: how long a service must be down before the ServiceDown alert fires
    down_after_s: float = 30.0
    #: a beamtime job (a beamtime server too) should start within this many seconds (p90)
    beamtime_start_target_s: float = 60.0
    retention_days: int = 15
    #: the Prometheus binary (Debian package prometheus)
    binary: str = "prometheus"


@dataclass
class ServiceLevelsConfig:
    """The targets `beamhub report sla` holds the measured service levels against."""

    #: each service's uptime over the report's period, per cent
    uptime_pct: float = 99.5
    #: per tier: the p90 seconds from a job's submission to its start
    time_to_start_p90_s: dict[str, float] = field(
        default_factory=lambda: {"beamtime": 60.0, "interactive": 120.0}
    )


@dataclass
class Deployment:
    enclave: str = "dev"
    state_dir: str = ""
    hub: HubConfig = field(default_factory=HubConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    dsn: DsnConfig = field(default_factory=DsnConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    tenancy: TenancyConfig = field(default_factory=TenancyConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    service_levels: ServiceLevelsConfig = field(default_factory=ServiceLevelsConfig)
    #: where this deployment was read from ("<embedded defaults>" if none)
    source: str = "<embedded defaults>"

    @property
    def rules(self) -> EnclaveProfile:
        return enclave_profile(self.enclave)

    @property
    def mfa_required(self) -> bool:
        if self.identity.require_mfa is not None:
            return self.identity.require_mfa
        return self.rules.mfa_required

    @property
    def dsn_template(self) -> str:
        """The DSN's channel template: dsn.template, else the one the enclave profile brings."""
        return self.dsn.template or self.rules.dsn_template

    @property
    def max_token_ttl(self) -> int:
        cap = self.rules.max_token_ttl
        if self.tokens.max_ttl is not None:
            return min(cap, self.tokens.max_ttl)
        return cap

    def user(self, name: str) -> UserSpec | None:
        return next((u for u in self.identity.users if u.username == name), None)


def default_deployment_path() -> Path:
    """The embedded defaults shipped inside the package (a copy of the repo's beamhub.yaml)."""
    return Path(__file__).with_name("beamhub.default.yaml")


_NO_SOURCE = {"source"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str, src: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where, src)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, src)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise DeploymentError(where, f"expected a list, got {type(value).__name__}", src)
        return [_convert(v, item_tp, f"{where}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise DeploymentError(where, f"expected a mapping, got {type(value).__name__}", src)
        return {str(k): _convert(v, val_tp, f"{where}.{k}", src) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise DeploymentError(where, f"expected true or false, got {value!r}", src)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DeploymentError(where, f"expected an integer, got {value!r}", src)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DeploymentError(where, f"expected a number, got {value!r}", src)
        return float(value)
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads an unquoted timestamp as a datetime
            return value.isoformat()
        if not isinstance(value, str):
            raise DeploymentError(where, f"expected a string, got {value!r}", src)
        return value
    raise DeploymentError(where, f"unsupported type {_type_name(tp)}", src)  # pragma: no cover


def _build(cls: type, data: Any, where: str, src: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DeploymentError(
            where or "<top>", f"expected a mapping, got {type(data).__name__}", src
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - _NO_SOURCE
    for key in data:
        if key not in names:
            path = f"{where}.{key}" if where else str(key)
            raise DeploymentError(
                path, f"unknown key; allowed here: {', '.join(sorted(names))}", src
            )
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        kwargs[key] = _convert(value, hints[key], path, src)
    return cls(**kwargs)


def _check_port(value: int, where: str, src: str) -> None:
    if not 0 <= value <= 65535:
        raise DeploymentError(where, f"port {value} is outside 0..65535 (0 = any free port)", src)


def _utc(value: str, where: str, src: str) -> datetime.datetime:
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise DeploymentError(
            where, f"{value!r} is not an ISO 8601 time, e.g. 2026-12-01T06:00:00Z", src
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def _validate_maintenance(windows: list[MaintenanceWindow], src: str) -> None:
    """Each window: start < end (ISO 8601, stored as UTC) and a non-empty ``what``."""
    for i, w in enumerate(windows):
        where = f"gateway.maintenance[{i}]"
        for name in ("start", "end", "what"):
            if not getattr(w, name).strip():
                raise DeploymentError(f"{where}.{name}", "required (start, end, what)", src)
        start, end = _utc(w.start, f"{where}.start", src), _utc(w.end, f"{where}.end", src)
        if end <= start:
            raise DeploymentError(f"{where}.end", f"{w.end} is not after start {w.start}", src)
        if len(w.what) > 200:
            raise DeploymentError(f"{where}.what", "at most 200 characters", src)
        w.start = start.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
        w.end = end.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def tenancy_refusal(dep: Deployment, euid: int | None = None) -> str | None:
    """Why this deployment must not start as ``euid`` (default: this process), or None.

    Only the dev enclave may run every user's server as the invoking account: anywhere else a
    member's code would hold the hub's secrets (the signing key, the admin token, the
    databases) and every other user's files.
    """
    euid = os.geteuid() if euid is None else euid
    run_as = dep.tenancy.resolved(euid)
    if run_as == "account" and euid != 0:
        return (
            "tenancy.run_as is 'account': each user's server runs as her own Unix account, "
            "which needs root; start `beamhub up` as root"
        )
    if run_as == "self" and dep.enclave != "dev":
        why = "without root" if euid != 0 else "with tenancy.run_as 'self'"
        return (
            f"the {dep.enclave} enclave refuses to start {why}: every user's server and jobs "
            "would run as one Unix account that can read the hub's secrets and the other "
            "users' files; run `beamhub up` as root (each user gets her own account), or use "
            "enclave: dev on a machine of your own"
        )
    return None


def _validate_tenancy(dep: Deployment, src: str) -> None:
    from beamhub.kernels.accounts import ACCOUNT_NAME

    ten = dep.tenancy
    if ten.run_as not in ("auto", "account", "self"):
        raise DeploymentError("tenancy.run_as", "use auto, account or self", src)
    if ten.run_as == "self" and dep.enclave != "dev":
        raise DeploymentError(
            "tenancy.run_as",
            f"'self' runs every user as one account: the dev enclave only, not {dep.enclave}",
            src,
        )
    if not ten.service_accounts and dep.enclave != "dev":
        raise DeploymentError(
            "tenancy.service_accounts",
            f"false runs every service as root, which may read every other's secrets: the dev "
            f"enclave only, not {dep.enclave}",
            src,
        )
    if "{username}" not in ten.account:
        raise DeploymentError("tenancy.account", "must contain {username}, e.g. bh-{username}", src)
    for i, user in enumerate(dep.identity.users):
        try:
            name = ten.account.format(username=user.username)
        except (KeyError, IndexError, ValueError) as exc:
            raise DeploymentError("tenancy.account", f"not a valid template: {exc}", src) from exc
        if not ACCOUNT_NAME.match(name):
            raise DeploymentError(
                "tenancy.account",
                f"identity.users[{i}] {user.username!r} would be {name!r}, not a valid Unix "
                "account name (lower case, digits, '-', '_', at most 32 characters)",
                src,
            )
    if ten.home_root and not ten.home_root.startswith("/"):
        raise DeploymentError("tenancy.home_root", 'an absolute path, or "" for /home', src)


def _validate(dep: Deployment, src: str) -> None:
    if dep.enclave not in ENCLAVES:
        raise DeploymentError(
            "enclave", f"unknown enclave {dep.enclave!r}; use one of {', '.join(ENCLAVES)}", src
        )
    _check_port(dep.hub.port, "hub.port", src)
    _check_port(dep.identity.port, "identity.port", src)
    _check_port(dep.dsn.port, "dsn.port", src)
    if not 0.2 <= dep.dashboard.update_hz <= 5.0:
        raise DeploymentError(
            "dashboard.update_hz",
            f"{dep.dashboard.update_hz} is outside 0.2..5 updates per second",
            src,
        )
    if not 8 <= dep.dashboard.image_px <= 512:
        raise DeploymentError(
            "dashboard.image_px", f"{dep.dashboard.image_px} is outside 8..512 pixels", src
        )
    if dep.dashboard.analysis:
        from beamhub.streaming.params import ParamError
        from beamhub.streaming.peakfinder import PeakFinderParams

        try:
            PeakFinderParams.create(dep.dashboard.analysis)
        except ParamError as exc:
            raise DeploymentError(f"dashboard.analysis.{exc.field}", exc.message, src) from exc
    if dep.hub.ip not in ("127.0.0.1", "localhost", "::1") and dep.enclave == "dev":
        raise DeploymentError("hub.ip", "the dev enclave listens on loopback only (127.0.0.1)", src)
    ident = dep.identity
    if ident.provider != "embedded":
        if not ident.provider.startswith(("http://", "https://")):
            raise DeploymentError(
                "identity.provider", "use 'embedded' or the external issuer's https:// URL", src
            )
        for name in ("authorize_url", "token_url", "userdata_url", "client_secret"):
            if not getattr(ident, name):
                raise DeploymentError(f"identity.{name}", "required for an external issuer", src)
    seen: set[str] = set()
    for i, user in enumerate(ident.users):
        where = f"identity.users[{i}]"
        if not user.username or not user.username.replace("-", "").replace("_", "").isalnum():
            raise DeploymentError(f"{where}.username", "letters, digits, '-' or '_' only", src)
        if user.username in seen:
            raise DeploymentError(f"{where}.username", f"duplicate user {user.username!r}", src)
        seen.add(user.username)
        for project, role in user.projects.items():
            if role not in ROLES:
                raise DeploymentError(
                    f"{where}.projects.{project}",
                    f"unknown role {role!r}; use one of {', '.join(ROLES)}",
                    src,
                )
    tok = dep.tokens
    if tok.ttl <= 0:
        raise DeploymentError("tokens.ttl", "must be a positive number of seconds", src)
    if tok.ttl > dep.max_token_ttl:
        raise DeploymentError(
            "tokens.ttl",
            f"{tok.ttl}s exceeds the {dep.enclave} enclave's cap of {dep.max_token_ttl}s; lower it",
            src,
        )
    if tok.revocation_poll <= 0 or tok.revocation_poll > tok.ttl:
        raise DeploymentError(
            "tokens.revocation_poll", f"must be in (0, tokens.ttl={tok.ttl}]", src
        )
    det = dep.detector
    if det.kind not in ("simulated",):
        raise DeploymentError("detector.kind", "only 'simulated' is supported by `beamhub up`", src)
    if det.rate_hz <= 0:
        raise DeploymentError("detector.rate_hz", "must be > 0", src)
    if len(det.shape) != 2 or any(n <= 0 for n in det.shape):
        raise DeploymentError("detector.shape", "two positive integers, e.g. [256, 256]", src)
    if not 0.0 <= det.hit_fraction <= 1.0:
        raise DeploymentError("detector.hit_fraction", "must be between 0 and 1", src)
    if det.print_every_s != 0 and not 0.5 <= det.print_every_s <= 3600:
        raise DeploymentError(
            "detector.print_every_s",
            f"{det.print_every_s} is outside 0.5..3600 seconds (0 = print no live figures)",
            src,
        )
    if dep.scheduler.backend not in ("local", "slurm"):
        raise DeploymentError("scheduler.backend", "use 'local' or 'slurm'", src)
    if dep.scheduler.nodes <= 0:
        raise DeploymentError("scheduler.nodes", "must be >= 1", src)
    _validate_maintenance(dep.gateway.maintenance, src)
    _validate_tenancy(dep, src)
    _validate_monitoring(dep.monitoring, src)
    _validate_service_levels(dep.service_levels, src)


def _validate_service_levels(levels: ServiceLevelsConfig, src: str) -> None:
    """Targets must be reachable numbers; a tier's name is checked when the report runs (a
    deployment may bring its own tiers file)."""
    if not 0 < levels.uptime_pct <= 100:
        raise DeploymentError(
            "service_levels.uptime_pct", f"{levels.uptime_pct} is outside 0..100 per cent", src
        )
    for tier, seconds in levels.time_to_start_p90_s.items():
        if seconds <= 0:
            raise DeploymentError(
                f"service_levels.time_to_start_p90_s.{tier}",
                f"{seconds} is not a positive number of seconds",
                src,
            )


def _validate_monitoring(mon: MonitoringConfig, src: str) -> None:
    """Bounds of the monitoring: section; the binary only when it is enabled."""
    _check_port(mon.port, "monitoring.port", src)
    if not 1.0 <= mon.scrape_interval_s <= 3600:
        raise DeploymentError(
            "monitoring.scrape_interval_s",
            f"{mon.scrape_interval_s} is outside 1..3600 seconds between scrapes",
            src,
        )
    if not 0 <= mon.down_after_s <= 86400:
        raise DeploymentError(
            "monitoring.down_after_s", f"{mon.down_after_s} is outside 0..86400 seconds", src
        )
    if mon.beamtime_start_target_s <= 0:
        raise DeploymentError(
            "monitoring.beamtime_start_target_s", "must be a positive number of seconds", src
        )
    if not 1 <= mon.retention_days <= 3650:
        raise DeploymentError(
            "monitoring.retention_days", f"{mon.retention_days} is outside 1..3650 days", src
        )
    if mon.enabled and shutil.which(mon.binary) is None:
        raise DeploymentError(
            "monitoring.binary",
            f"{mon.binary!r} is not installed: apt-get install prometheus (Debian), or name "
            "the binary here, or set monitoring.enabled: false",
            src,
        )


def _merge(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: mappings merge key by key; anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _merge(base.get(key), value) if key in base else value
        return out
    return over


def load_deployment(path: str | os.PathLike | None = None) -> Deployment:
    """Read and validate a deployment file; None reads the embedded defaults.

    Raises :class:`DeploymentError` naming the first bad field.
    """
    src_path = Path(path) if path is not None else default_deployment_path()
    src = str(path) if path is not None else "<embedded defaults>"
    try:
        text = src_path.read_text()
    except OSError as exc:
        raise DeploymentError("<file>", f"cannot read it: {exc.strerror}", src) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DeploymentError("<file>", f"not valid YAML: {exc}", src) from exc
    if path is not None:  # a key missing from the file takes the embedded default
        if data is not None and not isinstance(data, dict):
            raise DeploymentError(
                "<top>", "expected a mapping of sections (enclave, hub, ...)", src
            )
        explicit = data or {}
        data = _merge(yaml.safe_load(default_deployment_path().read_text()), explicit)
    else:
        explicit = {}
    dep = _build(Deployment, data, "", src)
    dep.source = src
    tokens = explicit.get("tokens") if isinstance(explicit, dict) else None
    if dep.enclave in ENCLAVES and not (isinstance(tokens, dict) and "ttl" in tokens):
        try:  # the enclave brings its token lifetime
            dep.tokens.ttl = min(dep.tokens.ttl, dep.max_token_ttl)
        except DeploymentError as exc:
            raise DeploymentError(exc.field, exc.message, src) from exc
    _validate(dep, src)
    _validate_profile(dep, src)
    return dep


#: beamhub.yaml field to name when a setting is looser than the enclave's profile allows.
_PROFILE_FIELDS = {
    "mfa": "identity.require_mfa",
    "token_ttl": "tokens.ttl",
    "dsn_template": "dsn.template",
    "dsn_modes": "dsn.template",
    "encryption": "dsn.template",
    "rate_limit_token": "gateway.rate_per_s",
    "rate_limit_project": "gateway.project_rate_per_s",
    "audit": "gateway.enabled",
    "qos_tiers": "scheduler.tiers",
}


def _validate_profile(dep: Deployment, src: str) -> None:
    """The enclave's profile brings its defaults (MFA, token lifetime, channel template, rate
    limits, audit); an explicit setting may tighten them, never loosen (an error naming it).

    The identity provider and the tenancy are left to `beamhub up` and `beamhub check`: the
    embedded dev IdP may stand in for a facility's while testing, and tenancy depends on root.
    """
    from beamhub.hub.enclave import check_deployment

    source = Path(src)
    base = source.resolve().parent if source.is_file() else None
    for req in check_deployment(dep, dep.rules, base):
        if not req.ok and req.name in _PROFILE_FIELDS:
            raise DeploymentError(
                _PROFILE_FIELDS[req.name],
                f"looser than the {dep.enclave} enclave allows: it requires {req.required}, "
                f"this deployment has {req.actual}; {req.fix}",
                src,
            )
