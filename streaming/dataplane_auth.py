"""ZAP for the DSN data plane: per-channel source-address allowlists (CIDRs) and CURVE keys.

pyzmq's :class:`zmq.auth.ThreadAuthenticator` runs the ZAP protocol; it knows exact addresses
only, globally. A channel needs CIDR ranges per *face* (the producer face and the consumer faces
have different allowlists) and, when encryption is required, its own set of registered CURVE
public keys. Every data-plane socket therefore gets a ZAP domain ``beamhub/<channel>/<face>``;
this authenticator checks the peer address against that domain's networks first and hands the
CURVE key check to pyzmq's callback machinery. Unknown domains are refused.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

__all__ = ["ChannelAuthenticator", "FacePolicy", "zap_domain"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def zap_domain(channel_id: str, face: str) -> str:
    """The ZAP domain of one face (``producer`` or ``consumer``) of a channel."""
    return f"beamhub/{channel_id}/{face}"


@dataclass(frozen=True)
class FacePolicy:
    """Who may connect to one face of a channel."""

    networks: tuple[Network, ...]
    curve_keys: tuple[bytes, ...] = ()  # z85 public keys allowed to connect
    curve: bool = False  # the face is a CURVE server: only ``curve_keys`` get in (none: nobody)

    def address_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)

    def key_allowed(self, z85_key: bytes) -> bool:
        # Compare every registered key in constant time; no early exit on a match.
        found = False
        for key in self.curve_keys:
            found |= hmac.compare_digest(key, z85_key)
        return found


class _KeyCallback:
    """pyzmq's CURVE credentials-provider protocol, answered from the face policies."""

    def __init__(self, auth: ChannelAuthenticator) -> None:
        self._auth = auth

    def callback(self, domain: str, z85_key: bytes) -> bool:
        policy = self._auth.policy(domain)
        return policy is not None and policy.key_allowed(z85_key)


class ChannelAuthenticator(ThreadAuthenticator):
    """One ZAP handler per ZeroMQ context, serving every channel's domains."""

    def __init__(self, context: zmq.Context, log: logging.Logger | None = None) -> None:
        super().__init__(context=context, log=log or logging.getLogger("beamhub.dsn.zap"))
        self._policies: dict[str, FacePolicy] = {}
        self._lock = threading.Lock()
        self.refused: dict[str, int] = {}

    def set_policy(self, domain: str, policy: FacePolicy) -> None:
        with self._lock:
            self._policies[domain] = policy
            self.refused.setdefault(domain, 0)
        if policy.curve or policy.curve_keys:
            self.configure_curve_callback(domain, _KeyCallback(self))

    def add_key(self, domain: str, z85_key: bytes) -> None:
        """Let one more CURVE public key in on ``domain`` (a client that registered its key)."""
        with self._lock:
            policy = self._policies.get(domain)
            if policy is None:
                raise KeyError(f"no ZAP domain {domain!r}")
            if z85_key not in policy.curve_keys:
                self._policies[domain] = FacePolicy(
                    policy.networks, (*policy.curve_keys, z85_key), curve=True
                )

    def remove_policy(self, domain: str) -> None:
        with self._lock:
            self._policies.pop(domain, None)
            self.refused.pop(domain, None)
            self.credentials_providers.pop(domain, None)

    def policy(self, domain: str) -> FacePolicy | None:
        with self._lock:
            return self._policies.get(domain)

    def _refuse(self, request_id: bytes, domain: str, address: str, why: bytes) -> None:
        with self._lock:
            if domain in self.refused:
                self.refused[domain] += 1
        self.log.warning("data plane refused %s on %s: %s", address, domain, why.decode())
        self._send_zap_reply(request_id, b"400", why)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        """Address check per domain; then pyzmq's own mechanism handling (CURVE callback)."""
        if len(msg) < 6:
            await super().handle_zap_message(msg)  # pyzmq answers malformed requests
            return
        request_id = msg[1]
        domain = msg[2].decode("utf-8", "replace")
        address = msg[3].decode("utf-8", "replace")
        mechanism = msg[5]
        policy = self.policy(domain)
        if policy is None:
            self._refuse(request_id, domain, address, b"Unknown domain")
            return
        if not policy.address_allowed(address):
            self._refuse(request_id, domain, address, b"Address not allowed")
            return
        if (policy.curve or policy.curve_keys) and mechanism != b"CURVE":
            self._refuse(request_id, domain, address, b"Encryption required")
            return
        if mechanism == b"CURVE" and not policy.key_allowed(_z85(msg[6:])):
            self._refuse(request_id, domain, address, b"Unknown key")
            return
        await super().handle_zap_message(msg)


def _z85(credentials: list[Any]) -> bytes:
    if len(credentials) != 1 or len(credentials[0]) != 32:
        return b""
    return z85.encode(credentials[0])
