"""The API gateway service: every request verified, authorised by policy, rate-limited, audited.

Admin power comes from the token's ``admin`` scope (which the token service mints only for hub
admins, for minutes), never from its subject alone. The client address is the peer, or what a
trusted proxy forwarded (:mod:`beamhub.hub.gateway.hygiene`); failed authentications are limited
per address and audited in aggregate; ``/metrics`` is for this host or a ``metrics`` token; the
audit chain's head is anchored at the token service (:mod:`beamhub.hub.gateway.anchor`).

Routes, actions and request schemas come from ``hub/gateway/openapi.yaml`` (served at
``/api/v1/openapi.json``); the operations themselves live in :mod:`beamhub.hub.gateway.ops`.
Handlers derive from :class:`beamhub.auth.api.JsonApiHandler`: errors in the one shape of every
beamhub service, bodies bounded from Content-Length before they are read. Runs as a JupyterHub
service (``python -m beamhub.hub.gateway.service``) or standalone in tests:
``url = Gateway(verifier, ...).start(port=0)`` … ``stop()``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import tornado.httpserver
import tornado.httputil
import tornado.netutil
import tornado.web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from beamhub.auth.api import ApiError, JsonApiHandler, log_request
from beamhub.auth.metrics import HealthzHandler
from beamhub.auth.roles import ADMIN_SCOPE, METRICS_SCOPE
from beamhub.auth.tokens import Claims, TokenError, TokenVerifier
from beamhub.hub.gateway.anchor import AuditAnchor
from beamhub.hub.gateway.api import (
    API_PREFIX,
    OPENAPI_PATH,
    Operation,
    RequestContext,
    load_openapi,
    parse_constant,
    routes,
    schema_error,
)
from beamhub.hub.gateway.audit import AuditLog
from beamhub.hub.gateway.hygiene import (
    AuthFailureGuard,
    client_address,
    is_loopback,
    parse_networks,
)
from beamhub.hub.gateway.jobs import SchedulerJobs
from beamhub.hub.gateway.ops import Operations, RawBody
from beamhub.hub.gateway.policy import Policy, PolicyRequest, load_policy
from beamhub.hub.gateway.ratelimit import RateLimiter

__all__ = [
    "METRICS_ACCESS",
    "OPENAPI_PATH",
    "ApiHandler",
    "Gateway",
    "RequestContext",
    "load_openapi",
]

log = logging.getLogger("beamhub.gateway")

#: Who may read ``/metrics``: ``local-or-token`` (default: a client on this host, or a token with
#: the ``metrics`` scope), ``token`` (only such a token), ``public`` (anyone).
METRICS_ACCESS = ("local-or-token", "token", "public")


class ApiHandler(JsonApiHandler):
    """Runs the pipeline (token → policy → rate limit → audit) and then the operation.

    The body limit is the gateway's ``max_body_bytes``: a larger declared body is refused with a
    JSON 413 before any of it is read (:class:`~beamhub.auth.api.JsonApiHandler`).
    """

    SUPPORTED_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
    service = "the gateway"

    def initialize(self, gateway: Gateway, ops: dict[str, Operation]) -> None:
        self.gateway = gateway
        self.ops = ops
        self.max_body = gateway.max_body_bytes

    async def get(self, **params: str) -> None:
        await self._handle(params)

    post = put = delete = patch = head = options = get

    async def _handle(self, params: dict[str, str]) -> None:
        gw = self.gateway
        started = time.perf_counter()
        op = self.ops.get(self.request.method)
        if op is None:
            raise ApiError(
                405,
                "method_not_allowed",
                f"{self.request.method} is not allowed on {self.request.path}; "
                f"allowed: {', '.join(sorted(self.ops))}",
            )
        if self.request.query_arguments:
            names = ", ".join(sorted(self.request.query_arguments))
            raise ApiError(
                400,
                "unknown_parameter",
                f"unknown query parameter(s): {names}; this API takes none",
            )
        ctx = RequestContext(
            action=op.action,
            method=self.request.method,
            path=self.request.path,
            source=gw.client_address(self.request),
            params=params,
            authorization=self.request.headers.get("Authorization", ""),
        )
        if op.secured:
            try:
                ctx.claims = gw.verifier.verify(self.bearer() or None)
            except TokenError as exc:
                raise gw.auth_failed(ctx, exc) from None
            ctx.roles = gw.roles_for(ctx.claims)
        if gw.layers:
            gw.authorise(ctx)
        ctx.body = self._body(op)
        status, payload = await gw.ops.run(op.name, ctx)
        gw.metrics_observe(op.action, "allow", time.perf_counter() - started)
        if isinstance(payload, RawBody):  # the calendar feed
            self.set_status(status)
            self.set_header("Content-Type", payload.content_type)
            self.finish(payload.data)
            return
        self.write_json(payload, status)

    def _body(self, op: Operation) -> dict[str, Any]:
        if op.validator is None:
            if self.raw_body().strip():
                raise ApiError(
                    400,
                    "unexpected_body",
                    f"{self.request.method} {self.request.path} takes no request body; send none",
                )
            return {}
        body = self.json_body(parse_constant=parse_constant)
        errors = list(op.validator.iter_errors(body))
        if errors:
            raise schema_error(errors)
        return body


class NotFoundHandler(ApiHandler):
    def initialize(self, gateway: Gateway, ops: dict[str, Operation] | None = None) -> None:
        super().initialize(gateway, {})

    async def _handle(self, params: dict[str, str]) -> None:
        raise ApiError(
            404,
            "not_found",
            f"no API route {self.request.path!r}; see "
            f"{self.gateway.base_url}{API_PREFIX}/openapi.json for the routes",
        )


class MetricsHandler(JsonApiHandler):
    """Prometheus metrics, for whom ``metrics_access`` allows; refusals in the one error shape."""

    service = "the gateway"
    max_body = 0

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def get(self) -> None:
        gw = self.gateway
        source = gw.client_address(self.request)
        local = gw.metrics_access == "local-or-token" and is_loopback(source)
        if gw.metrics_access != "public" and not local:
            ctx = RequestContext("metrics", "GET", self.request.path, source, {})
            try:
                claims = gw.verifier.verify(self.bearer() or None)
            except TokenError as exc:
                raise gw.auth_failed(ctx, exc) from None
            if METRICS_SCOPE not in claims.scopes:
                where = " from this host, or" if gw.metrics_access == "local-or-token" else ""
                raise ApiError(
                    403,
                    "scope",
                    f"the gateway's metrics are read{where} with a token that has the "
                    f"{METRICS_SCOPE!r} scope (a hub admin mints one)",
                )
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(gw.registry))


class Gateway:
    """The gateway: its layers are injected; ``layers=False`` keeps only token verification
    (the benchmark's baseline). Jobs go to ``scheduler``: the hub's jobs API
    (:class:`~beamhub.kernels.hub_backend.HubScheduler`) under `beamhub up`, or a scheduler in
    this process (:mod:`beamhub.hub.gateway.jobs`). ``state_dir`` is `beamhub up`'s state folder:
    the public status then shows its supervisor's state of every service (``status.json``)."""

    def __init__(
        self,
        verifier: TokenVerifier,
        *,
        policy: Policy | None = None,
        limiter: RateLimiter | None = None,
        audit: AuditLog | None = None,
        dsn_url: str | None = None,
        reservations: Any = None,
        scheduler: Any = None,
        state_dir: str | Path | None = None,
        enclave: str = "dev",
        admin_users: Iterable[str] = (),
        maintenance: Iterable[Mapping[str, Any]] = (),
        nodes: Callable[[], Awaitable[list[dict]]] | None = None,
        base_url: str = "/",
        max_body_bytes: int = 64 * 1024,
        layers: bool = True,
        openapi_path: str | Path = OPENAPI_PATH,
        trusted_proxies: Iterable[str] = (),
        auth_failures: AuthFailureGuard | None = None,
        metrics_access: str = "local-or-token",
        anchor: AuditAnchor | None = None,
    ) -> None:
        self.verifier = verifier
        self.policy = policy or load_policy()
        self.limiter = limiter
        self.audit = audit
        self.dsn_url = dsn_url.rstrip("/") if dsn_url else None
        self.reservations = reservations
        self.scheduler = scheduler
        self.jobs = SchedulerJobs(scheduler) if scheduler is not None else None
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.enclave = enclave
        self.admin_users = frozenset(admin_users)
        self.maintenance = [dict(m) for m in maintenance]
        self.nodes = nodes
        self.base_url = "/" + base_url.strip("/") + "/" if base_url.strip("/") else "/"
        self.max_body_bytes = max_body_bytes
        self.layers = layers
        self.trusted_proxies = parse_networks(trusted_proxies)
        self.auth_failures = auth_failures if auth_failures is not None else AuthFailureGuard()
        if metrics_access not in METRICS_ACCESS:
            raise ValueError(f"metrics_access {metrics_access!r}: use one of {METRICS_ACCESS}")
        self.metrics_access = metrics_access
        self.anchor = anchor
        self._tasks: list[asyncio.Task] = []
        self.openapi = load_openapi(openapi_path)
        self.ops = Operations(self)
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "beamhub_gateway_requests",
            "gateway requests by action and outcome",
            ["action", "outcome"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "beamhub_gateway_request_seconds",
            "time to answer allowed requests",
            ["action"],
            registry=self.registry,
        )
        self.url: str | None = None
        self._server: tornado.httpserver.HTTPServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- the layers --------------------------------------------------------------------------
    def roles_for(self, claims: Claims) -> frozenset[str]:
        """``admin`` only for a token with the admin scope, of a facility admin: a narrow token
        of an admin carries only its scopes' power."""
        if ADMIN_SCOPE in claims.scopes and claims.sub in self.admin_users:
            return frozenset({"admin"})
        return frozenset()

    def client_address(self, request: tornado.httputil.HTTPServerRequest) -> str:
        """The peer, or the client a trusted proxy forwarded (X-Forwarded-For)."""
        return client_address(
            request.remote_ip or "",
            request.headers.get_list("X-Forwarded-For"),
            self.trusted_proxies,
        )

    def auth_failed(self, ctx: RequestContext, exc: TokenError) -> ApiError:
        """The answer to a failed authentication: 401 (403), or 429 once the client's address
        has spent its burst of failures; counted for the aggregated audit record."""
        self._requests.labels(ctx.action, "deny").inc()
        wait = self.auth_failures.failed(ctx.source, exc.reason, f"{ctx.method} {ctx.path}")
        if wait > 0:
            seconds = str(max(1, math.ceil(wait)))
            return ApiError(
                429,
                "rate_limited",
                f"too many failed authentications from {ctx.source}; retry after {seconds} s "
                "with a valid token",
                bucket="address",
                retry_after=wait,
                headers={"Retry-After": seconds},
            )
        challenge = {}
        if exc.status == 401:  # RFC 6750: no error code when no token was sent
            challenge["WWW-Authenticate"] = 'Bearer realm="beamhub"' + (
                ""
                if exc.reason == "missing"
                else f', error="invalid_token", error_description="{exc.reason}"'
            )
        return ApiError(exc.status, exc.reason, exc.message, headers=challenge)

    def flush_auth_failures(self) -> int:
        """One audit record per address with failures since the last flush; how many."""
        tallies = self.auth_failures.drain()
        if self.audit is None:
            return 0
        for source, tally in sorted(tallies.items()):
            self.audit.append(
                action="auth.failed",
                resource=tally.paths.most_common(1)[0][0],
                rule="auth-failures",
                source=source,
                outcome="deny",
                status=401,
                reason=AuthFailureGuard.describe(tally, self.auth_failures.interval),
                count=tally.count,
            )
        return len(tallies)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.auth_failures.interval)  # a period, not a readiness signal
            self.flush_auth_failures()

    def authorise(self, ctx: RequestContext) -> None:
        """Policy, then rate limit, then the audit record of the decision; raise on refusal."""
        claims = ctx.claims
        request = PolicyRequest(
            action=ctx.action,
            user=claims.sub if claims else None,
            token_project=claims.project if claims else None,
            project=ctx.project or (claims.project if claims else None),
            scopes=claims.scopes if claims else frozenset(),
            roles=ctx.roles,
            enclave=self.enclave,
            source=ctx.source,
            resource=ctx.path,
        )
        decision = self.policy.evaluate(request)
        if not decision.allow:
            self.record(ctx, "deny", decision.rule, 403, decision.reason)
            raise ApiError(
                403, "policy", f"denied by policy: {decision.reason}", decision=decision.as_dict()
            )
        if self.limiter is not None:
            if claims is not None:
                verdict = self.limiter.check(claims.jti, ctx.project or claims.project)
            else:
                verdict = self.limiter.check(f"ip:{ctx.source}", None)
            if not verdict.allowed:
                wait = verdict.retry_after_header
                why = f"rate limit of this {verdict.bucket} reached; retry after {wait} s"
                self.record(ctx, "deny", f"ratelimit.{verdict.bucket}", 429, why)
                raise ApiError(
                    429,
                    "rate_limited",
                    why,
                    bucket=verdict.bucket,
                    retry_after=verdict.retry_after,
                    headers={"Retry-After": wait},
                )
        self.record(ctx, "allow", decision.rule, None, "")

    def record(
        self, ctx: RequestContext, outcome: str, rule: str, status: int | None, reason: str
    ) -> None:
        """One audit record per decision; the token's jti, never the token."""
        if outcome == "deny":
            self._requests.labels(ctx.action, outcome).inc()
        # (failed authentications are counted in auth_failed and audited in aggregate)
        if self.audit is None:
            return
        claims = ctx.claims
        self.audit.append(
            user=claims.sub if claims else None,
            project=ctx.project or (claims.project if claims else None),
            jti=claims.jti if claims else None,
            action=ctx.action,
            resource=f"{ctx.method} {ctx.path}",
            rule=rule,
            source=ctx.source,
            outcome=outcome,
            status=status,
            reason=reason,
        )

    def metrics_observe(self, action: str, outcome: str, seconds: float) -> None:
        if outcome == "allow":
            self._requests.labels(action, outcome).inc()
            self._latency.labels(action).observe(seconds)

    # -- serving -----------------------------------------------------------------------------
    def make_app(self) -> tornado.web.Application:
        prefix = re.escape(self.base_url + API_PREFIX)
        handlers: list[Any] = [
            (rf"{prefix}{regex}/?", ApiHandler, {"gateway": self, "ops": ops})
            for regex, ops in routes(self.openapi)
        ]
        handlers.append((rf"{re.escape(self.base_url)}metrics", MetricsHandler, {"gateway": self}))
        handlers.append(
            (rf"{re.escape(self.base_url)}healthz", HealthzHandler, {"service": "the gateway"})
        )
        return tornado.web.Application(
            handlers,
            default_handler_class=NotFoundHandler,
            default_handler_args={"gateway": self},
            log_function=functools.partial(log_request, logger=log),
        )

    async def start_async(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Listen on ``host:port`` (0 = any free port) in the running loop; return the base URL."""
        sockets = tornado.netutil.bind_sockets(port, address=host)
        # a declared body over max_body_bytes is refused with a JSON 413 before it is read; the
        # server's hard cap only bounds a chunked body, which the handler cuts off at the limit
        self._server = tornado.httpserver.HTTPServer(
            self.make_app(), max_body_size=max(16 * self.max_body_bytes, 64 << 20)
        )
        self._server.add_sockets(sockets)
        self._tasks.append(asyncio.ensure_future(self._flush_loop()))
        if self.anchor is not None:
            self.anchor.start()
        bound = sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound}{self.base_url}{API_PREFIX}"
        log.info("gateway listening on %s (enclave %s)", self.url, self.enclave)
        return self.url

    async def stop_async(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.flush_auth_failures()
        if self.anchor is not None:
            await self.anchor.stop()
        await self.ops.close()

    def start(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Serve on a background thread with its own event loop; return the API base URL."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self.start_async(port, host))
            except BaseException as exc:  # reported to the caller of start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop_async())
                loop.close()

        self._thread = threading.Thread(target=run, name="beamhub-gateway", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        if self.url is None:
            raise RuntimeError("the gateway did not start within 30 s")
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(15)
            self._thread = None
            self._loop = None
