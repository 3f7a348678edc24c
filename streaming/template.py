"""The admin template: the bounds a facility puts on what users may ask of the DSN's channels.

A template is YAML written by the facility's admins. :meth:`Template.load` validates the template
itself (one clear error per bad field); :meth:`Template.check` turns a user's channel request into
effective parameters or raises :class:`TemplateViolation` naming the field, the limit and what to do
(HTTP 400 for malformed or out-of-range values, 403 for values the template does not allow).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from beamhub.streaming.template_fields import (
    WHEN_NO_CONSUMER,
    Network,
    TemplateError,
    is_int,
    is_number,
    is_z85_key,
    read_bounded,
    read_networks,
    read_when_no_consumer,
)

__all__ = [
    "MODES",
    "TEMPLATE_DIR",
    "WHEN_NO_CONSUMER",
    "ChannelParams",
    "Template",
    "TemplateError",
    "TemplateViolation",
]

MODES = ("l4", "l7")
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
STREAM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Fields a channel request may carry; anything else is refused by name.
REQUEST_FIELDS = frozenset(
    "stream mode source_cidrs consumer_cidrs hwm max_frame_bytes max_rate_hz encryption "
    "producer_keys consumer_keys source_control ttl monitor when_no_consumer".split()
)
MAX_LIST_ENTRIES = 64


class TemplateViolation(Exception):
    """A channel request outside the template: ``status`` 400 (malformed) or 403 (not allowed)."""

    def __init__(
        self, field: str, limit: Any, message: str, status: int = 400, reason: str = "invalid"
    ) -> None:
        super().__init__(message)
        self.field = field
        self.limit = limit
        self.message = message
        self.status = status
        self.reason = reason

    def to_json(self) -> dict[str, Any]:
        return {
            "error": self.message,
            "reason": self.reason,
            "field": self.field,
            "limit": self.limit,
        }


@dataclass(frozen=True)
class ChannelParams:
    """A request after the template: every value explicit and inside the bounds."""

    stream: str
    mode: str
    source_cidrs: tuple[str, ...]
    consumer_cidrs: tuple[str, ...]
    hwm: int
    max_frame_bytes: int
    max_rate_hz: float | None
    encryption: bool
    producer_keys: tuple[str, ...]
    consumer_keys: tuple[str, ...]
    source_control: str | None
    ttl: int
    monitor: bool
    when_no_consumer: str = "wait"

    def to_json(self) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in body.items()}


@dataclass(frozen=True)
class Template:
    """What an admin allows. Build with :meth:`load` or :meth:`from_mapping`."""

    name: str
    source_cidrs: tuple[Network, ...]
    consumer_cidrs: tuple[Network, ...]
    modes: tuple[str, ...]
    default_mode: str
    hwm_min: int
    hwm_max: int
    hwm_default: int
    max_frame_bytes: int
    default_frame_bytes: int
    max_rate_hz: float | None
    default_rate_hz: float | None
    encryption_required: bool
    max_lifetime_s: int
    max_channels_per_project: int
    #: channels one user may hold at once inside the project's quota
    max_channels_per_user: int = 0
    #: channels of the project's quota only its PI and operators (a ``steer`` token) may take
    manager_reserve: int = 0
    when_no_consumer_allowed: tuple[str, ...] = WHEN_NO_CONSUMER
    when_no_consumer_default: str = "wait"
    source: str = field(default="<mapping>")

    # ---- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Template:
        """Read and validate a template file; ``None`` is the packaged dev default."""
        path = Path(path) if path is not None else TEMPLATE_DIR / "default.yaml"
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise TemplateError(f"{path}: cannot read the template ({exc.strerror})") from exc
        except yaml.YAMLError as exc:
            raise TemplateError(f"{path}: not valid YAML ({exc})") from exc
        try:
            return cls.from_mapping(data, source=str(path))
        except TemplateError as exc:
            raise TemplateError(f"{path}: {exc}") from None

    @classmethod
    def from_mapping(cls, data: Any, source: str = "<mapping>") -> Template:
        if not isinstance(data, Mapping):
            raise TemplateError("the template must be a YAML mapping of field: value")
        known = {
            "name",
            "description",
            "source_cidrs",
            "consumer_cidrs",
            "modes",
            "default_mode",
            "hwm",
            "max_frame_bytes",
            "max_rate_hz",
            "encryption_required",
            "max_lifetime_s",
            "max_channels_per_project",
            "max_channels_per_user",
            "manager_reserve",
            "when_no_consumer",
        }
        unknown = set(data) - known
        if unknown:
            raise TemplateError(f"unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        modes = data.get("modes", list(MODES))
        if not isinstance(modes, list) or not modes or any(m not in MODES for m in modes):
            raise TemplateError(f"modes: a non-empty list drawn from {list(MODES)}, got {modes!r}")
        default_mode = data.get("default_mode", modes[-1])
        if default_mode not in modes:
            raise TemplateError(f"default_mode: {default_mode!r} is not one of modes {modes}")
        hwm_min, hwm_max, hwm_default = read_bounded(data.get("hwm"), "hwm", need_min=True)
        if not all(is_int(v) for v in (hwm_max, hwm_default)):
            raise TemplateError("hwm: min, max and default must be integers (messages)")
        _, fb_max, fb_default = read_bounded(
            data.get("max_frame_bytes"), "max_frame_bytes", need_min=False
        )
        if not (is_int(fb_max) and is_int(fb_default)):
            raise TemplateError("max_frame_bytes: max and default must be integers (bytes)")
        _, rate_max, rate_default = read_bounded(
            data.get("max_rate_hz", {"max": None}), "max_rate_hz", need_min=False, allow_null=True
        )
        enc = data.get("encryption_required", False)
        if not isinstance(enc, bool):
            raise TemplateError(f"encryption_required: true or false, got {enc!r}")
        lifetime = data.get("max_lifetime_s", 86400)
        if not is_int(lifetime) or lifetime <= 0:
            raise TemplateError(f"max_lifetime_s: a positive integer (seconds), got {lifetime!r}")
        max_channels = data.get("max_channels_per_project", 16)
        if not is_int(max_channels) or max_channels <= 0:
            raise TemplateError(
                f"max_channels_per_project: a positive integer, got {max_channels!r}"
            )
        reserve = data.get("manager_reserve", 1 if max_channels > 1 else 0)
        if not is_int(reserve) or not 0 <= reserve < max_channels:
            raise TemplateError(
                f"manager_reserve: an integer from 0 to max_channels_per_project - 1 "
                f"({max_channels - 1}), got {reserve!r}"
            )
        per_user = data.get("max_channels_per_user", max(1, (max_channels - reserve) // 2))
        if not is_int(per_user) or not 1 <= per_user <= max_channels:
            raise TemplateError(
                f"max_channels_per_user: an integer from 1 to max_channels_per_project "
                f"({max_channels}), got {per_user!r}"
            )
        wnc_allowed, wnc_default = read_when_no_consumer(data.get("when_no_consumer"))
        name = data.get("name", Path(source).stem)
        if not isinstance(name, str) or not name:
            raise TemplateError(f"name: a non-empty string, got {name!r}")
        return cls(
            name=name,
            source_cidrs=read_networks(data.get("source_cidrs"), "source_cidrs"),
            consumer_cidrs=read_networks(data.get("consumer_cidrs"), "consumer_cidrs"),
            modes=tuple(modes),
            default_mode=default_mode,
            hwm_min=int(hwm_min),
            hwm_max=int(hwm_max),
            hwm_default=int(hwm_default),
            max_frame_bytes=int(fb_max),
            default_frame_bytes=int(fb_default),
            max_rate_hz=None if rate_max is None else float(rate_max),
            default_rate_hz=None if rate_default is None else float(rate_default),
            encryption_required=enc,
            max_lifetime_s=lifetime,
            max_channels_per_project=max_channels,
            max_channels_per_user=per_user,
            manager_reserve=reserve,
            when_no_consumer_allowed=wnc_allowed,
            when_no_consumer_default=wnc_default,
            source=source,
        )

    def describe(self) -> dict[str, Any]:
        """The bounds as JSON, for users asking what they may request."""
        return {
            "name": self.name,
            "source_cidrs": [str(n) for n in self.source_cidrs],
            "consumer_cidrs": [str(n) for n in self.consumer_cidrs],
            "modes": list(self.modes),
            "default_mode": self.default_mode,
            "hwm": {"min": self.hwm_min, "max": self.hwm_max, "default": self.hwm_default},
            "max_frame_bytes": {"max": self.max_frame_bytes, "default": self.default_frame_bytes},
            "max_rate_hz": {"max": self.max_rate_hz, "default": self.default_rate_hz},
            "encryption_required": self.encryption_required,
            "max_lifetime_s": self.max_lifetime_s,
            "max_channels_per_project": self.max_channels_per_project,
            "max_channels_per_user": self.max_channels_per_user,
            "manager_reserve": self.manager_reserve,
            "when_no_consumer": {
                "allowed": list(self.when_no_consumer_allowed),
                "default": self.when_no_consumer_default,
            },
        }

    # ---- checking a request ------------------------------------------------------------------

    def check(
        self,
        request: Any,
        *,
        active_channels: int = 0,
        user_channels: int = 0,
        manager: bool = True,
    ) -> ChannelParams:
        """Effective parameters for ``request`` (omitted fields get the defaults), or a violation.

        ``active_channels``: the project's channels now; ``user_channels``: the caller's own;
        ``manager``: the caller may manage the project's channels (PI or operator), so the
        reserve is open to her and the per-user quota does not apply.
        """
        if not isinstance(request, Mapping):
            raise TemplateViolation("body", None, "the request body must be a JSON object")
        unknown = sorted(set(request) - REQUEST_FIELDS)
        if unknown:
            raise TemplateViolation(
                unknown[0],
                sorted(REQUEST_FIELDS),
                f"unknown field {unknown[0]!r}; a channel request may carry "
                f"{', '.join(sorted(REQUEST_FIELDS))}",
                400,
                "unknown_field",
            )
        if active_channels >= self.max_channels_per_project:
            raise TemplateViolation(
                "channels",
                self.max_channels_per_project,
                f"the project already has {active_channels} channel(s), the template's maximum; "
                "delete one or let one expire first",
                403,
                "max_channels",
            )
        if not manager:
            open_to_members = self.max_channels_per_project - self.manager_reserve
            if user_channels >= self.max_channels_per_user:
                raise TemplateViolation(
                    "channels",
                    self.max_channels_per_user,
                    f"you already hold {user_channels} channel(s) of this project, the "
                    f"template's maximum per user; delete one of yours or let one expire first",
                    403,
                    "max_channels_per_user",
                )
            if active_channels >= open_to_members:
                raise TemplateViolation(
                    "channels",
                    open_to_members,
                    f"the project holds {active_channels} channel(s); the last "
                    f"{self.manager_reserve} are kept for its PI and operators; ask one of "
                    "them, or delete a channel first",
                    403,
                    "max_channels",
                )
        stream = request.get("stream")
        if not isinstance(stream, str) or not STREAM_RE.match(stream):
            raise TemplateViolation(
                "stream",
                STREAM_RE.pattern,
                "stream: a name of 1-64 letters, digits, '.', '_' or '-', e.g. 'detector-1'",
            )
        mode = request.get("mode", self.default_mode)
        if mode not in MODES:
            raise TemplateViolation("mode", list(self.modes), f"mode: one of {list(MODES)}")
        if mode not in self.modes:
            raise TemplateViolation(
                "mode",
                list(self.modes),
                f"mode {mode!r} is not allowed by template {self.name!r}; "
                f"allowed: {list(self.modes)}",
                403,
                "not_allowed",
            )
        sources = self._cidrs(request, "source_cidrs", self.source_cidrs)
        consumers = self._cidrs(request, "consumer_cidrs", self.consumer_cidrs)
        hwm = request.get("hwm", self.hwm_default)
        if not is_int(hwm) or not self.hwm_min <= hwm <= self.hwm_max:
            raise TemplateViolation(
                "hwm",
                {"min": self.hwm_min, "max": self.hwm_max},
                f"hwm: an integer from {self.hwm_min} to {self.hwm_max} (messages buffered), "
                f"got {hwm!r}",
                400,
                "out_of_range",
            )
        frame = request.get("max_frame_bytes", self.default_frame_bytes)
        if not is_int(frame) or not 1 <= frame <= self.max_frame_bytes:
            raise TemplateViolation(
                "max_frame_bytes",
                self.max_frame_bytes,
                f"max_frame_bytes: an integer from 1 to {self.max_frame_bytes}, got {frame!r}",
                400,
                "out_of_range",
            )
        rate = request.get("max_rate_hz")
        if rate is None:
            rate = self.default_rate_hz
        elif (
            not is_number(rate)
            or rate <= 0
            or (self.max_rate_hz is not None and rate > self.max_rate_hz)
        ):
            limit = self.max_rate_hz
            raise TemplateViolation(
                "max_rate_hz",
                limit,
                f"max_rate_hz: a positive number of frames per second"
                f"{'' if limit is None else f' up to {limit:g}'}, got {rate!r}",
                400,
                "out_of_range",
            )
        encryption, producer_keys, consumer_keys = self._encryption(request)
        ttl = request.get("ttl", self.max_lifetime_s)
        if not is_int(ttl) or not 1 <= ttl <= self.max_lifetime_s:
            raise TemplateViolation(
                "ttl",
                self.max_lifetime_s,
                f"ttl: channel lifetime in whole seconds from 1 to {self.max_lifetime_s}, "
                f"got {ttl!r}",
                400,
                "out_of_range",
            )
        monitor = request.get("monitor", True)
        if not isinstance(monitor, bool):
            raise TemplateViolation("monitor", None, "monitor: true or false")
        when_no_consumer = self._when_no_consumer(request, mode)
        return ChannelParams(
            stream=stream,
            mode=mode,
            source_cidrs=tuple(str(n) for n in sources),
            consumer_cidrs=tuple(str(n) for n in consumers),
            hwm=hwm,
            max_frame_bytes=frame,
            max_rate_hz=None if rate is None else float(rate),
            encryption=encryption,
            producer_keys=producer_keys,
            consumer_keys=consumer_keys,
            source_control=self.check_source_control(request.get("source_control"), sources),
            ttl=ttl,
            monitor=monitor,
            when_no_consumer=when_no_consumer,
        )

    def _when_no_consumer(self, request: Mapping, mode: str) -> str:
        allowed = list(self.when_no_consumer_allowed)
        value = request.get("when_no_consumer")
        if value is None:
            value = self.when_no_consumer_default
            if mode == "l4" and value == "drop":
                value = "wait"  # the template's default cannot apply to an L4 channel
            return value
        if value not in WHEN_NO_CONSUMER:
            raise TemplateViolation(
                "when_no_consumer",
                allowed,
                f"when_no_consumer: 'wait' (frames wait for a work consumer; lossless) or 'drop' "
                f"(frames that arrive while no work consumer is connected are dropped and "
                f"counted; L7 only), got {value!r}",
                400,
                "invalid",
            )
        if value not in allowed:
            raise TemplateViolation(
                "when_no_consumer",
                allowed,
                f"when_no_consumer {value!r} is not allowed by template {self.name!r}; "
                f"allowed: {allowed}",
                403,
                "not_allowed",
            )
        if value == "drop" and mode != "l7":
            raise TemplateViolation(
                "when_no_consumer",
                {"drop": ["l7"]},
                f"when_no_consumer 'drop' needs mode 'l7': the {mode} router forwards in C with "
                "no per-message code, so it cannot tell or drop frames nobody consumes; ask for "
                "mode 'l7' or leave when_no_consumer at 'wait'",
                400,
                "needs_l7",
            )
        return value

    def _cidrs(self, request: Mapping, name: str, allowed: Sequence[Network]) -> list[Network]:
        limit = [str(n) for n in allowed]
        value = request.get(name)
        if value is None:
            return list(allowed)
        if not isinstance(value, list) or not value or len(value) > MAX_LIST_ENTRIES:
            raise TemplateViolation(
                name,
                limit,
                f"{name}: a list of 1-{MAX_LIST_ENTRIES} networks such as "
                f"'{limit[0]}' or single addresses",
            )
        nets = []
        for item in value:
            try:
                net = ipaddress.ip_network(item, strict=True) if isinstance(item, str) else None
            except ValueError:
                net = None
            if net is None:
                raise TemplateViolation(
                    name,
                    limit,
                    f"{name}: {item!r} is not a network (write e.g. '10.1.2.0/24' "
                    "with the host bits zero, or one address such as '10.1.2.3')",
                )
            if not any(net.version == a.version and net.subnet_of(a) for a in allowed):
                raise TemplateViolation(
                    name,
                    limit,
                    f"{name}: {item} is outside the template's allowed networks "
                    f"{limit}; ask the facility's admins to extend the template",
                    403,
                    "not_allowed",
                )
            nets.append(net)
        return nets

    def _encryption(self, request: Mapping) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
        """Every channel is CURVE (a credential on every channel, also in dev); with
        ``encryption_required`` the request must also name the producers' keys, so the channel
        never exists without one. Consumers (and further producers) register theirs afterwards
        with their own token (``POST .../credentials``): who reads is not known at creation."""
        encryption = request.get("encryption", True)
        if not isinstance(encryption, bool):
            raise TemplateViolation("encryption", True, "encryption: true (or leave it out)")
        if not encryption:
            how = (
                "send the CURVE public keys of the producer(s)"
                if self.encryption_required
                else "clients register their CURVE keys with POST /api/channels/ID/credentials"
            )
            raise TemplateViolation(
                "encryption",
                True,
                f"every channel of template {self.name!r} uses CURVE (each face needs a "
                f'credential): leave out "encryption" or send true; {how}',
                403,
                "encryption_required",
            )
        require_keys = self.encryption_required
        keys = {}
        for name in ("producer_keys", "consumer_keys"):
            value = request.get(name, [])
            if not isinstance(value, list) or len(value) > MAX_LIST_ENTRIES:
                raise TemplateViolation(
                    name, MAX_LIST_ENTRIES, f"{name}: a list of Z85 CURVE public keys"
                )
            for key in value:
                if not is_z85_key(key):
                    raise TemplateViolation(
                        name,
                        None,
                        f"{name}: {str(key)[:48]!r} is not a 40-character Z85 CURVE "
                        "public key (make one with zmq.curve_keypair())",
                    )
            keys[name] = tuple(value)
            if require_keys and name == "producer_keys" and not value:
                raise TemplateViolation(
                    name,
                    None,
                    f"encryption needs {name}: the Z85 CURVE public keys allowed to "
                    f"connect as {name.split('_')[0]}s",
                    403,
                    "keys_required",
                )
        return True, keys["producer_keys"], keys["consumer_keys"]

    def check_source_control(self, value: Any, source_cidrs: Sequence[Network | str]) -> str | None:
        """The source's control URL, normalised; it must point into the channel's source networks
        (the DSN relays steering only to the source, never elsewhere)."""
        if value is None:
            return None
        sources = [ipaddress.ip_network(n) for n in source_cidrs]
        limit = [str(n) for n in sources]
        addr = parts = None
        if isinstance(value, str):
            parts = urlsplit(value)
            try:
                host = parts.hostname or ""
                addr = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
                _ = parts.port  # raises ValueError on a bad port
            except ValueError:
                addr = None
        if (
            addr is None
            or parts.scheme not in ("http", "https")
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username
        ):
            raise TemplateViolation(
                "source_control",
                limit,
                "source_control: the source's control URL as "
                "'http://ADDRESS:PORT' with an IP address, e.g. 'http://127.0.0.1:8200'",
            )
        if not any(addr in net for net in sources):
            raise TemplateViolation(
                "source_control",
                limit,
                f"source_control: {addr} is outside the channel's "
                f"source networks {limit}; steering may only reach the source",
                403,
                "not_allowed",
            )
        return f"{parts.scheme}://{parts.netloc}"
