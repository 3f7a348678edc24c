"""Run the API gateway as a JupyterHub service (or standalone): wire its layers from beamhub.yaml.

``beamhub up`` starts it as ``python -m beamhub.hub.gateway.service --deployment beamhub.yaml``;
JupyterHub passes ``JUPYTERHUB_SERVICE_URL`` (where to listen), ``JUPYTERHUB_SERVICE_PREFIX``
(``/services/gateway/``) and ``JUPYTERHUB_API_URL``/``JUPYTERHUB_API_TOKEN``, with which jobs are
forwarded to the hub's jobs API (the local scheduler lives in the hub process). Standalone:
``python -m beamhub.hub.gateway.service --port 8081 --dsn-url http://127.0.0.1:PORT``.

As a hub service it trusts the proxy on loopback for X-Forwarded-For (``--trusted-proxy``), and
anchors its audit chain at the token service with its own JupyterHub API token (the token
service's URL is the one its JWKS comes from, or ``--tokens-url``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from beamhub.auth.home import state_dir
from beamhub.auth.tokens import RevocationCache, TokenVerifier, load_jwks
from beamhub.hub.enclave import EnclaveError, load_profile, resolve_path
from beamhub.hub.gateway.anchor import DEFAULT_LOG_NAME, AuditAnchor
from beamhub.hub.gateway.app import METRICS_ACCESS, Gateway
from beamhub.hub.gateway.audit import AuditError, AuditLog
from beamhub.hub.gateway.config_changes import ConfigWatch
from beamhub.hub.gateway.hygiene import LOOPBACK, AuthFailureGuard
from beamhub.hub.gateway.ops import node_occupancy
from beamhub.hub.gateway.policy import DEFAULT_POLICY_PATH, PolicyError, load_policy
from beamhub.hub.gateway.policy_tests import failures
from beamhub.hub.gateway.ratelimit import Limit, RateLimiter
from beamhub.hub.up.deployment import DeploymentError, load_deployment
from beamhub.kernels.backends import SchedulerConfig
from beamhub.kernels.hub_backend import HubScheduler
from beamhub.kernels.local import read_jobs, virtual_nodes
from beamhub.kernels.reservations import ReservationBook

__all__ = ["build_gateway", "main"]

log = logging.getLogger("beamhub.gateway")
EMBEDDED = "<embedded defaults>"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m beamhub.hub.gateway.service", description=__doc__)
    p.add_argument("--deployment", default=None, help="beamhub.yaml (default: embedded defaults)")
    p.add_argument(
        "--state-dir",
        default=None,
        help="keys, runtime.json, audit log (default: "
        "$BEAMHUB_HOME, the deployment's state_dir, ~/.beamhub)",
    )
    p.add_argument(
        "--host",
        default=None,
        help="listen address (default from JUPYTERHUB_SERVICE_URL, else 127.0.0.1)",
    )
    p.add_argument("--port", type=int, default=None, help="listen port (0 = any free port)")
    p.add_argument(
        "--base-url", default=None, help="URL prefix (default JUPYTERHUB_SERVICE_PREFIX)"
    )
    p.add_argument("--dsn-url", default=None, help="the DSN's control API (default: runtime.json)")
    p.add_argument(
        "--jwks",
        default=None,
        help="the token service's JWKS, a file or URL (default: the token service named in "
        "runtime.json)",
    )
    p.add_argument("--revoked-url", default=None, help="the token service's /revoked list")
    p.add_argument(
        "--policy",
        default=None,
        help="policy file (default: beamhub.yaml's gateway.policy, found beside beamhub.yaml, "
        "in the working directory or shipped with beamhub; else the shipped default policy)",
    )
    p.add_argument("--audit-log", default=None, help="audit log (default: gateway.audit_log)")
    p.add_argument("--admin", action="append", default=None, help="facility admin user(s)")
    p.add_argument(
        "--trusted-proxy",
        action="append",
        default=None,
        metavar="CIDR",
        help="a proxy whose X-Forwarded-For names the client (repeatable; 'none' for none); "
        "default: loopback when run as a hub service (configurable-http-proxy), else none",
    )
    p.add_argument(
        "--metrics",
        choices=METRICS_ACCESS,
        default="local-or-token",
        help="who may read /metrics: a client on this host or a token with the 'metrics' "
        "scope (default), only such a token, or anyone",
    )
    p.add_argument(
        "--auth-failures",
        default="1/20/60",
        metavar="RATE/BURST/INTERVAL",
        help="failed authentications per client address: refill per second, burst, and the "
        "interval in seconds of their aggregated audit records (default 1/20/60)",
    )
    p.add_argument(
        "--tokens-url",
        default=None,
        help="the token service that signs audit checkpoints (default: where --jwks points)",
    )
    p.add_argument(
        "--audit-name", default=DEFAULT_LOG_NAME, help="the log's name in the checkpoints"
    )
    p.add_argument(
        "--checkpoint-interval",
        type=float,
        default=10.0,
        help="seconds between audit checkpoints (default 10; 0 = none)",
    )
    return p


def _auth_failures(text: str) -> AuthFailureGuard:
    try:
        rate, burst, interval = (float(x) for x in text.split("/"))
        return AuthFailureGuard(Limit(rate, int(burst)), interval=interval)
    except ValueError as exc:
        raise ValueError(
            f"--auth-failures {text!r}: RATE/BURST/INTERVAL, e.g. 1/20/60 ({exc})"
        ) from None


def _trusted_proxies(args: argparse.Namespace) -> list[str]:
    if args.trusted_proxy is None:
        return list(LOOPBACK) if os.environ.get("JUPYTERHUB_SERVICE_URL") else []
    return [t for t in args.trusted_proxy if t.lower() != "none"]


def _anchor(args: argparse.Namespace, jwks_source: str, audit: AuditLog) -> AuditAnchor | None:
    """The audit anchor at the token service, if it and the gateway's hub API token are known."""
    tokens_url = args.tokens_url
    if tokens_url is None and jwks_source.startswith(("http://", "https://")):
        tokens_url = jwks_source.removesuffix("jwks.json")
    api_token = os.environ.get("JUPYTERHUB_API_TOKEN")
    if args.checkpoint_interval <= 0 or not tokens_url or not api_token:
        log.warning(
            "audit log not anchored: it needs the token service's URL (--tokens-url) and the "
            "gateway's JUPYTERHUB_API_TOKEN; truncation and re-chaining will not be detected"
        )
        return None
    return AuditAnchor(audit, tokens_url, api_token, args.audit_name, args.checkpoint_interval)


def _state_dir(args: argparse.Namespace, dep: Any) -> Path:
    if args.state_dir or os.environ.get("BEAMHUB_HOME") or not dep.state_dir:
        return Path(args.state_dir).expanduser() if args.state_dir else state_dir()
    return Path(dep.state_dir).expanduser()


def _policy_path(args: argparse.Namespace, dep: Any) -> Path | None:
    """``--policy`` (as given); else ``gateway.policy`` of beamhub.yaml, resolved as every file
    it names is (its folder, the working directory, the package); None = the shipped default."""
    if args.policy:
        return Path(args.policy).expanduser()
    if not dep.gateway.policy:
        return None
    source = Path(dep.source)
    return resolve_path(dep.gateway.policy, source.resolve().parent if source.is_file() else None)


def build_gateway(argv: list[str] | None = None) -> tuple[Gateway, str, int, list[Any]]:
    """The configured :class:`~beamhub.hub.gateway.app.Gateway`, where to listen, and what to
    close after."""
    args = _parser().parse_args(argv)
    dep = load_deployment(None if args.deployment in (None, EMBEDDED) else args.deployment)
    profile = load_profile(dep.enclave)
    state = _state_dir(args, dep)
    runtime_path = Path(os.environ.get("BEAMHUB_RUNTIME") or state / "runtime.json")
    runtime = json.loads(runtime_path.read_text()) if runtime_path.exists() else {}

    service_url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", ""))
    host = args.host or service_url.hostname or "127.0.0.1"
    port = args.port if args.port is not None else (service_url.port or 0)
    base_url = args.base_url or os.environ.get("JUPYTERHUB_SERVICE_PREFIX") or "/"

    # verify with the token service's public JWKS; only the token service opens the signing key
    jwks_source = args.jwks
    if not jwks_source and runtime.get("tokens_port"):
        jwks_source = (
            f"http://{runtime.get('ip', '127.0.0.1')}:{runtime['tokens_port']}"
            "/services/tokens/jwks.json"
        )
    if not jwks_source:
        raise SystemExit(
            f"no JWKS to verify tokens with: pass --jwks with the token service's JWKS URL "
            f"(.../services/tokens/jwks.json) or a file (`beamhub token jwks > jwks.json`); "
            f"{runtime_path} names no token service"
        )
    jwks = load_jwks(jwks_source)
    closers: list[Any] = []
    revoked_url = args.revoked_url
    if revoked_url is None and runtime.get("port"):
        revoked_url = (
            f"http://{runtime.get('ip', '127.0.0.1')}:{runtime['port']}/services/tokens/revoked"
        )
    is_revoked = None
    if revoked_url:
        cache = RevocationCache(revoked_url, interval=dep.tokens.revocation_poll).start()
        closers.append(cache)
        is_revoked = cache.is_revoked
    verifier = TokenVerifier(
        jwks, issuer=dep.tokens.issuer, audience=dep.tokens.audience, is_revoked=is_revoked
    )

    gw = dep.gateway
    per_token = (
        Limit(gw.rate_per_s, gw.burst) if gw.rate_per_s and gw.burst else profile.rate_per_token
    )
    per_project = (
        Limit(gw.project_rate_per_s, gw.project_burst)
        if gw.project_rate_per_s and gw.project_burst
        else profile.rate_per_project
    )
    audit_path = Path(args.audit_log or gw.audit_log or state / "audit.jsonl").expanduser()
    audit = AuditLog(
        audit_path, fsync=profile.audit_fsync if profile.audit_fsync != "never" else "interval"
    )
    closers.append(audit)

    admins = (
        args.admin
        if args.admin is not None
        else runtime.get("admin_users", [u.username for u in dep.identity.users if u.admin])
    )
    config = SchedulerConfig(state_dir=str(state / "scheduler"))
    reservations = ReservationBook(
        config.reservations_path, admins=admins, separate_duties=profile.separation_of_duties
    )

    hub_jobs = None
    hub_api, hub_token = (
        os.environ.get("JUPYTERHUB_API_URL"),
        os.environ.get("JUPYTERHUB_API_TOKEN"),
    )
    if hub_api and hub_token:
        hub_jobs = HubScheduler(hub_api, hub_token)
    else:
        log.warning(
            "jobs disabled: JUPYTERHUB_API_URL/JUPYTERHUB_API_TOKEN are set only when "
            "the hub runs the gateway as a service"
        )

    policy_path = _policy_path(args, dep)
    policy = load_policy(policy_path)
    failed = failures(policy)
    if failed:
        raise PolicyError(
            f"{policy.source}: the policy's own tests fail (`beamhub policy test --rules "
            f"{policy.source}`): " + "; ".join(failed)
        )
    gateway = Gateway(
        verifier,
        nodes=_local_nodes(state / "scheduler", dep) if hub_jobs is not None else None,
        policy=policy,
        limiter=RateLimiter(per_token, per_project),
        audit=audit,
        dsn_url=args.dsn_url or runtime.get("dsn_url") or None,
        reservations=reservations,
        scheduler=hub_jobs,
        state_dir=state,
        enclave=dep.enclave,
        maintenance=[dataclasses.asdict(m) for m in gw.maintenance],
        admin_users=admins,
        base_url=base_url,
        trusted_proxies=_trusted_proxies(args),
        auth_failures=_auth_failures(args.auth_failures),
        metrics_access=args.metrics,
        anchor=_anchor(args, str(jwks_source), audit),
    )
    log.info("audit log %s (fsync %s); policy %s", audit_path, audit.fsync, gateway.policy.source)
    gateway.config_watch = ConfigWatch(  # type: ignore[attr-defined]
        _watched(dep, policy_path), state / "gateway-config"
    )
    log.info(
        "trusted proxies %s; metrics %s; audit anchor %s",
        [str(n) for n in gateway.trusted_proxies] or "none",
        gateway.metrics_access,
        gateway.anchor or "none",
    )
    return gateway, host, port, closers


def _watched(dep: Any, policy_path: Path | None) -> list[tuple[str, Path]]:
    """What the change records cover: beamhub.yaml, the policy and the stream templates (the
    DSN's template and the others in its folder)."""
    files: list[tuple[str, Path]] = []
    source = Path(dep.source)
    if source.is_file():
        files.append(("deployment", source))
    files.append(("policy", policy_path or DEFAULT_POLICY_PATH))
    base = source.resolve().parent if source.is_file() else None
    template = resolve_path(dep.dsn_template, base).resolve()
    others = sorted(template.parent.glob("*.yaml")) if template.parent.is_dir() else []
    for path in dict.fromkeys([template, *others]):
        files.append(("template", path))
    return files


def _local_nodes(scheduler_dir: Path, dep: Any) -> Callable[[], Awaitable[list[dict]]] | None:
    """The public status's nodes under `beamhub up` with the local backend: its virtual nodes
    (as beamhub.yaml sizes them) and the running jobs in its database, read without the hub."""
    if dep.scheduler.backend != "local":
        return None  # SLURM: `sinfo` is the place to look
    cpus = {n.name: n.cpus for n in virtual_nodes(dep.scheduler.nodes)}
    db = scheduler_dir / "local-jobs.sqlite"

    async def read() -> list[dict]:
        jobs = await asyncio.to_thread(read_jobs, db) if db.exists() else []
        return node_occupancy(cpus, jobs)

    return read


async def _serve(gateway: Gateway, host: str, port: int) -> None:
    url = await gateway.start_async(port, host)
    print(
        f"beamhub gateway listening on {url} (status: {url}/status, API: {url}/openapi.json)",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watch: ConfigWatch | None = getattr(gateway, "config_watch", None)
    reloads: set[asyncio.Task] = set()

    def reload(trigger: str) -> None:
        async def run() -> None:
            try:
                result = await asyncio.to_thread(watch.reload, gateway, trigger)
                log.info(
                    "config %s: %d change(s), refused %s",
                    trigger,
                    len(result["changes"]),
                    result["refused"] or "none",
                )
            except Exception:  # a failed reload keeps the gateway serving with what it has
                log.exception("config reload (%s) failed", trigger)

        task = asyncio.ensure_future(run())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    if watch is not None:
        reload("start")
        loop.add_signal_handler(signal.SIGHUP, reload, "SIGHUP")
    await stop.wait()
    print("beamhub gateway stopping", flush=True)
    await gateway.stop_async()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        gateway, host, port, closers = build_gateway(argv)
    except (DeploymentError, EnclaveError, PolicyError, AuditError, OSError, ValueError) as exc:
        print(f"beamhub gateway: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(gateway, host, port))
    finally:
        for closer in closers:
            closer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
