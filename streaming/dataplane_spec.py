"""What the control plane asks the data plane for: a channel's spec, checked field by field.

:class:`ChannelSpec` is already bounded by the admin template; :func:`validate_spec` is the data
plane's own last check (a direct caller gets a ValueError naming the field), and
:class:`ChannelEndpoints` is what producers and consumers connect to.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MODES",
    "WHEN_NO_CONSUMER",
    "ChannelEndpoints",
    "ChannelSpec",
    "curve_keys",
    "validate_spec",
]

MODES = ("l4", "l7")
#: What the L7 gateway does with a frame while no work consumer is connected.
WHEN_NO_CONSUMER = ("wait", "drop")
_CHANNEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_Z85_KEY = re.compile(r"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


@dataclass(frozen=True)
class ChannelSpec:
    """What the control plane asks for (already checked against the admin template)."""

    channel_id: str
    project: str
    stream: str
    mode: str
    producer_cidrs: tuple[str, ...]
    consumer_cidrs: tuple[str, ...]
    hwm: int
    max_frame_bytes: int
    max_rate_hz: float | None
    curve: bool = False
    producer_keys: tuple[str, ...] = ()
    consumer_keys: tuple[str, ...] = ()
    monitor: bool = True
    when_no_consumer: str = "wait"


@dataclass(frozen=True)
class ChannelEndpoints:
    """Where producers and consumers connect."""

    producer: str
    work: str
    monitor: str | None
    report: str | None
    server_key: str | None


def _networks(field: str, cidrs: tuple[str, ...]) -> tuple[Any, ...]:
    if isinstance(cidrs, str) or not cidrs:
        raise ValueError(f"{field}: give a non-empty list of CIDRs such as ['10.0.0.0/24']")
    nets = []
    for cidr in cidrs:
        try:
            nets.append(ipaddress.ip_network(cidr, strict=False))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{field}: {cidr!r} is not a CIDR such as '10.0.0.0/24'") from exc
    return tuple(nets)


def curve_keys(field: str, keys: tuple[str, ...]) -> tuple[bytes, ...]:
    """The z85 keys as bytes; an empty list is allowed (clients register keys later)."""
    if isinstance(keys, str):
        raise ValueError(f"{field}: a list of z85 CURVE public keys, not one string")
    out = []
    for key in keys:
        text = key.decode() if isinstance(key, bytes) else key
        if not isinstance(text, str) or not _Z85_KEY.match(text):
            raise ValueError(f"{field}: {key!r} is not a 40-character z85 CURVE public key")
        out.append(text.encode())
    return tuple(out)


def validate_spec(spec: ChannelSpec) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Raise ValueError naming the field; return the parsed (producer, consumer) networks."""
    if not isinstance(spec.channel_id, str) or not _CHANNEL_ID.match(spec.channel_id):
        raise ValueError("channel_id: 1-64 letters, digits, '.', '_' or '-'")
    if not isinstance(spec.stream, str) or not spec.stream:
        raise ValueError("stream: give the stream name producers put in their headers")
    if spec.mode not in MODES:
        raise ValueError(f"mode: {spec.mode!r} is not one of {', '.join(MODES)}")
    if (
        isinstance(spec.hwm, bool)
        or not isinstance(spec.hwm, int)
        or not 1 <= spec.hwm <= 1_000_000
    ):
        raise ValueError(f"hwm: {spec.hwm!r} must be an integer between 1 and 1000000 messages")
    if (
        isinstance(spec.max_frame_bytes, bool)
        or not isinstance(spec.max_frame_bytes, int)
        or spec.max_frame_bytes < 1
    ):
        raise ValueError(f"max_frame_bytes: {spec.max_frame_bytes!r} must be a positive integer")
    if spec.max_rate_hz is not None and not (
        isinstance(spec.max_rate_hz, int | float) and 0 < spec.max_rate_hz < float("inf")
    ):
        raise ValueError(f"max_rate_hz: {spec.max_rate_hz!r} must be a positive number or None")
    if spec.when_no_consumer not in WHEN_NO_CONSUMER:
        raise ValueError(
            f"when_no_consumer: {spec.when_no_consumer!r} is not one of "
            f"{', '.join(WHEN_NO_CONSUMER)}"
        )
    if spec.when_no_consumer == "drop" and spec.mode != "l7":
        raise ValueError(
            "when_no_consumer: 'drop' needs mode l7 (the L4 router forwards in C and cannot "
            "drop per message); use mode l7, or when_no_consumer 'wait'"
        )
    nets = (
        _networks("producer_cidrs", spec.producer_cidrs),
        _networks("consumer_cidrs", spec.consumer_cidrs),
    )
    if spec.curve:
        curve_keys("producer_keys", spec.producer_keys)
        curve_keys("consumer_keys", spec.consumer_keys)
    return nets
